"""The meshlet node agent: CLI, configuration, Consul client, registration and watches."""
