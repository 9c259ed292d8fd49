"""The exception tree of the traffic package.

Each error carries Consul's own text, so a control plane can answer exactly as Consul does: the
HTTP status differs by family (400 for a body Consul cannot decode, 500 for an entry it decodes
but refuses, 500 for a set of entries whose discovery chain cannot be compiled).
"""

from __future__ import annotations


class TrafficError(ValueError):
    """Base of every error this package raises; str() is Consul's text."""


class EntryDecodeError(TrafficError):
    """The body cannot be decoded into the kind's fields (Consul answers 400)."""


class InvalidEntry(TrafficError):
    """The entry decodes but Normalize/Validate refuses it (Consul answers 500)."""


class GraphError(TrafficError):
    """The entries together cannot be compiled into a discovery chain (Consul answers 500)."""
