"""Lean typed entries of a `/v1/health/connect/<name>` answer, decoded straight from its bytes.

The upstream watch reads this answer for every upstream, and for a large upstream it is
megabytes of JSON of which an endpoint needs a few fields per entry. `decode_entries` parses
the body with msgspec into frozen structs that hold only those fields: every other field
(node meta, tagged addresses, check output, proxy config, service tags and meta, ...) is
skipped by the parser without building a Python object, which is what makes a 10,000-instance
answer cost milliseconds instead of the ~80 ms `json.loads` took.

Strictness is that of `consul_results.ServiceEntry.from_json` for every field kept: a field of
the wrong type, a missing required one, or a check status other than passing, warning or
critical is a `ShapeError` naming the JSON path (`$[12].Service.Port`). Fields the snapshot
does not read are not type-checked (the JSON around them must still be valid JSON). Fields
Consul may send as null or omit read as their default, as `from_json` reads them.

The structs are frozen and hashable, so an entry is its own memo key: two entries that compare
equal give the same endpoint (see `catalog.decode_answer`).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from agent.consul_json import ShapeError
from agent.consul_results import NODE_MAINTENANCE_CHECK, SERVICE_MAINTENANCE_PREFIX, HealthStatus

# Every struct is frozen (immutable, hashable) and outside the cyclic GC (gc=False: they never
# hold a cycle, and tens of thousands of them live in the memo of a large upstream).


class NodeFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    name: str = msgspec.field(name="Node")
    address: str = msgspec.field(name="Address")


class WeightsFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    passing: int | None = msgspec.field(name="Passing", default=None)


class ProxyFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    destination_service_name: str | None = msgspec.field(
        name="DestinationServiceName", default=None
    )


class ConnectFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    native: bool | None = msgspec.field(name="Native", default=None)


class ServiceFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    id: str = msgspec.field(name="ID")
    service: str = msgspec.field(name="Service")
    kind: str | None = msgspec.field(name="Kind", default=None)
    address: str | None = msgspec.field(name="Address", default=None)
    port: int | None = msgspec.field(name="Port", default=None)
    weights: WeightsFields | None = msgspec.field(name="Weights", default=None)
    proxy: ProxyFields | None = msgspec.field(name="Proxy", default=None)
    connect: ConnectFields | None = msgspec.field(name="Connect", default=None)


class CheckFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    check_id: str = msgspec.field(name="CheckID")
    status: Literal["passing", "warning", "critical"] = msgspec.field(name="Status")


class HealthEntry(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """One entry of the answer: what `catalog.endpoint_of_entry` needs of it, nothing more."""

    node: NodeFields = msgspec.field(name="Node")
    service: ServiceFields = msgspec.field(name="Service")
    checks: tuple[CheckFields, ...] | None = msgspec.field(name="Checks", default=None)

    def aggregate(self) -> HealthStatus:
        """`consul_results.aggregate_status` of the entry's checks."""
        worst = HealthStatus.PASSING
        for check in self.checks or ():
            cid = check.check_id
            if cid == NODE_MAINTENANCE_CHECK or cid.startswith(SERVICE_MAINTENANCE_PREFIX):
                return HealthStatus.MAINTENANCE
            if check.status == "critical":
                worst = HealthStatus.CRITICAL
            elif check.status == "warning" and worst is HealthStatus.PASSING:
                worst = HealthStatus.WARNING
        return worst


_decoder = msgspec.json.Decoder(tuple[HealthEntry, ...])


def decode_entries(body: bytes) -> tuple[HealthEntry, ...]:
    """The entries of a `/v1/health/connect` answer, or `ShapeError` saying what is wrong."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ShapeError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ShapeError(f"response is not JSON: {exc}") from None
    except RecursionError:
        # Nesting deeper than the interpreter's limit, e.g. inside a field we skip.
        raise ShapeError("response is not JSON this agent reads: nested too deeply") from None


__all__ = [
    "CheckFields",
    "ConnectFields",
    "HealthEntry",
    "NodeFields",
    "ProxyFields",
    "ServiceFields",
    "WeightsFields",
    "decode_entries",
]
