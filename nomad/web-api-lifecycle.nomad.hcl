# web -> api on Nomad with meshlet as a plain prestart sidecar task, no `connect` block
# (docs/nomad.md, "Without Connect"). meshlet registers each service and its connect-proxy
# itself, exactly as on a VM, and deregisters both when Nomad stops it.
#
# Compared with web-api.nomad.hcl: no `consul` CLI needed on the clients, host networking
# (any driver), one configuration for VMs and Nomad; but no NOMAD_UPSTREAM_* variables and no
# validation of upstreams by Nomad. Each group's ports are dynamic, so two instances can share
# a client; the sidecar listens on the client's address, each app on 127.0.0.1.
#
# meshlet's token needs service:write on the service (see docs/nomad.md); here it comes from
# the task's Consul workload identity (CONSUL_HTTP_TOKEN, set by Nomad).

job "web-api-lifecycle" {
  datacenters = ["dc1"]
  type        = "service"

  group "api" {
    count = 2

    network {
      mode = "host"
      port "http" {}
      port "mesh" {}
      port "admin" {}
    }

    task "meshlet" {
      driver = "raw_exec"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      consul {}

      config {
        command = "/opt/meshlet/bin/meshlet"
        args    = ["sidecar", "-c", "${NOMAD_TASK_DIR}/meshlet.yaml"]
      }

      env {
        CONSUL_HTTP_ADDR = "http://127.0.0.1:8500"
      }

      template {
        destination = "local/meshlet.yaml"
        change_mode = "signal"
        change_signal = "SIGHUP"
        data        = <<-EOT
          service:
            name: api
            id: api-{{ env "NOMAD_ALLOC_ID" }}
            address: 127.0.0.1
            port: {{ env "NOMAD_PORT_http" }}
            check:
              http: http://127.0.0.1:{{ env "NOMAD_PORT_http" }}/health
              interval: 10s
              deregister_critical_service_after: 1m
          sidecar:
            address: {{ env "NOMAD_IP_mesh" }}
            port: {{ env "NOMAD_PORT_mesh" }}
            protocol: http
          admin:
            address: 127.0.0.1:{{ env "NOMAD_PORT_admin" }}
        EOT
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      resources {
        cpu    = 200
        memory = 192
      }
    }

    task "api" {
      driver = "exec"

      config {
        command = "/usr/local/bin/api"
        args    = ["--listen", "127.0.0.1:${NOMAD_PORT_http}"]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }

  group "web" {
    count = 1

    network {
      mode = "host"
      port "http" {
        static = 8000
      }
      port "mesh" {}
      port "admin" {}
      port "api_upstream" {}
    }

    task "meshlet" {
      driver = "raw_exec"

      lifecycle {
        hook    = "prestart"
        sidecar = true
      }

      consul {}

      config {
        command = "/opt/meshlet/bin/meshlet"
        args    = ["sidecar", "-c", "${NOMAD_TASK_DIR}/meshlet.yaml"]
      }

      env {
        CONSUL_HTTP_ADDR = "http://127.0.0.1:8500"
      }

      template {
        destination = "local/meshlet.yaml"
        change_mode = "signal"
        change_signal = "SIGHUP"
        data        = <<-EOT
          service:
            name: web
            id: web-{{ env "NOMAD_ALLOC_ID" }}
            address: {{ env "NOMAD_IP_http" }}
            port: {{ env "NOMAD_PORT_http" }}
            check:
              tcp: {{ env "NOMAD_IP_http" }}:{{ env "NOMAD_PORT_http" }}
              interval: 10s
              deregister_critical_service_after: 1m
          sidecar:
            address: {{ env "NOMAD_IP_mesh" }}
            port: {{ env "NOMAD_PORT_mesh" }}
            protocol: http
            upstreams:
              - name: api
                local_bind_port: {{ env "NOMAD_PORT_api_upstream" }}
                protocol: http
          admin:
            address: 127.0.0.1:{{ env "NOMAD_PORT_admin" }}
        EOT
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      resources {
        cpu    = 200
        memory = 192
      }
    }

    task "web" {
      driver = "exec"

      config {
        command = "/usr/local/bin/web"
        args    = ["--listen", "${NOMAD_IP_http}:${NOMAD_PORT_http}"]
      }

      env {
        API_URL = "http://127.0.0.1:${NOMAD_PORT_api_upstream}"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
