"""Authorization, pure: AuthorizationPolicy, translation to Consul intentions, decisions."""
