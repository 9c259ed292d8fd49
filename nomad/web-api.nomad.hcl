# web -> api on Nomad, with meshlet as each group's Connect sidecar (docs/nomad.md).
#
# Everything meshlet-specific is inside the two `sidecar_task` blocks. Delete them and Nomad
# runs its default Envoy sidecar from the same registration, ports and upstreams; put them
# back and meshlet takes over. meshlet reads what Nomad gives Envoy: the proxy ID from
# ${NOMAD_SECRETS_DIR}/envoy_bootstrap.json, the token from ${NOMAD_SECRETS_DIR}/si_token or
# that bootstrap, and the rest (service, app port, listener port, upstreams) from the proxy's
# registration in Consul, which Nomad owns: meshlet never registers or deregisters it.
#
# Clients need: the `consul` CLI on the Nomad agent's PATH (Nomad writes the bootstrap with it
# whatever the sidecar is), CNI plugins for bridge networking, and meshlet installed where the
# exec driver's chroot sees it (client `chroot_env` must include /opt/meshlet).

job "web-api" {
  datacenters = ["dc1"]
  type        = "service"

  group "api" {
    count = 2

    network {
      mode = "bridge"
    }

    service {
      name = "api"
      port = "8080"

      connect {
        sidecar_service {
          proxy {
            local_service_address = "127.0.0.1"
            local_service_port    = 8080

            config {
              protocol = "http"
            }
          }
        }

        sidecar_task {
          name   = "meshlet-api"
          driver = "exec"

          config {
            command = "/opt/meshlet/bin/meshlet"
            args    = ["sidecar", "--nomad", "--bootstrap", "${NOMAD_SECRETS_DIR}/envoy_bootstrap.json"]
          }

          env {
            # Nomad forwards only Consul's gRPC port into the group's network namespace;
            # meshlet speaks Consul's HTTP API, so point it at an address the namespace can
            # route to (Consul's client_addr must include it).
            CONSUL_HTTP_ADDR = "http://${attr.unique.network.ip-address}:8500"
          }

          resources {
            cpu    = 200
            memory = 192
          }

          # Nomad signals sidecars after the group's main tasks have stopped, so there is
          # nothing left to drain; 10s covers closing the listeners.
          kill_timeout = "10s"
        }
      }
    }

    task "api" {
      driver = "exec"

      config {
        command = "/usr/local/bin/api"
        args    = ["--listen", "127.0.0.1:8080"]
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
      mode = "bridge"

      port "http" {
        static = 8000
        to     = 8000
      }
    }

    service {
      name = "web"
      port = "8000"

      connect {
        sidecar_service {
          proxy {
            local_service_address = "127.0.0.1"
            local_service_port    = 8000

            config {
              protocol = "http"
            }

            upstreams {
              destination_name = "api"
              local_bind_port  = 9191

              config {
                protocol = "http"
              }
            }
          }
        }

        sidecar_task {
          name   = "meshlet-web"
          driver = "exec"

          config {
            command = "/opt/meshlet/bin/meshlet"
            args    = ["sidecar", "--nomad", "--bootstrap", "${NOMAD_SECRETS_DIR}/envoy_bootstrap.json"]
          }

          env {
            CONSUL_HTTP_ADDR = "http://${attr.unique.network.ip-address}:8500"
          }

          resources {
            cpu    = 200
            memory = 192
          }

          kill_timeout = "10s"
        }
      }
    }

    task "web" {
      driver = "exec"

      config {
        command = "/usr/local/bin/web"
        args    = ["--listen", "0.0.0.0:8000"]
      }

      env {
        # 127.0.0.1:9191: web's sidecar carries it to an api instance over mTLS.
        API_URL = "http://${NOMAD_UPSTREAM_ADDR_api}"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
