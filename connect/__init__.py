"""Identity and data plane: SPIFFE identities, leaf certificates, TLS and the sidecar proxy."""
