# `meshlet agent` on every Nomad client (a system job): registration only, no proxy, for a
# service every client runs outside Nomad, here a metrics exporter on port 9100. meshlet
# registers it with its check and keeps the registration true (anti-entropy), and removes it
# when Nomad stops the task (docs/nomad.md, "On every client").

job "meshlet-agent" {
  datacenters = ["dc1"]
  type        = "system"

  group "meshlet-agent" {
    network {
      mode = "host"
      port "admin" {
        static = 19010
      }
    }

    task "meshlet-agent" {
      driver = "raw_exec"

      config {
        command = "/opt/meshlet/bin/meshlet"
        args    = ["agent", "-c", "${NOMAD_TASK_DIR}/agent.yaml"]
      }

      env {
        CONSUL_HTTP_ADDR = "http://127.0.0.1:8500"
        NODE_NAME        = "${node.unique.name}"
        NODE_IP          = "${attr.unique.network.ip-address}"
      }

      template {
        destination   = "local/agent.yaml"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        data          = <<-EOT
          service:
            name: node-exporter
            id: node-exporter-{{ env "NODE_NAME" }}
            address: {{ env "NODE_IP" }}
            port: 9100
            check:
              http: http://{{ env "NODE_IP" }}:9100/metrics
              interval: 15s
          admin:
            address: 127.0.0.1:{{ env "NOMAD_PORT_admin" }}
        EOT
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      resources {
        cpu    = 50
        memory = 64
      }
    }
  }
}
