"""Consul's L7 traffic management as pure data: routing config entries and the discovery chain."""
