"""An embedded, in-memory control plane that speaks Consul's HTTP API like `consul agent -dev`."""
