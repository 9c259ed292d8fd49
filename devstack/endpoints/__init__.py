"""HTTP endpoints of devstack, one module per Consul API family."""
