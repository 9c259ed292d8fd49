"""Lean typed entries of a `/v1/health/connect/<name>` answer, decoded straight from its bytes.

The upstream watch reads this answer for every upstream, and for a large upstream it is
megabytes of JSON of which an endpoint needs a few fields per entry, and of which an update
changes a few entries. `split_entries` parses the body with msgspec into one raw JSON view per
entry without building any; `decode_entry` turns one into a frozen struct that holds only the
fields an endpoint needs: every other field (node meta, tagged addresses, check output, proxy
config, service tags and meta, ...) is skipped by the parser without building a Python object.
The watch decodes only the entries whose bytes it has not seen (`catalog.decode_answer`).

Strictness is that of `consul_results.ServiceEntry.from_json` for every field kept: a field of
the wrong type, a missing required one, or a check status other than passing, warning or
critical is a `ShapeError` naming the JSON path (`$[12].Service.Port`). Fields the snapshot
does not read are not type-checked (the JSON around them must still be valid JSON). Fields
Consul may send as null or omit read as their default, as `from_json` reads them.

"""

from __future__ import annotations

from typing import Literal

import msgspec

from agent.consul_json import ShapeError
from agent.consul_results import NODE_MAINTENANCE_CHECK, SERVICE_MAINTENANCE_PREFIX, HealthStatus

# Every struct is frozen and outside the cyclic GC (gc=False: they never hold a cycle, and a
# first answer builds tens of thousands of them).


class NodeFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    name: str = msgspec.field(name="Node")
    address: str = msgspec.field(name="Address")


class WeightsFields(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    passing: int | None = msgspec.field(name="Passing", default=None)
    warning: int | None = msgspec.field(name="Warning", default=None)


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


_entries = msgspec.json.Decoder(tuple[msgspec.Raw, ...])
_entry = msgspec.json.Decoder(HealthEntry)


def split_entries(body: bytes) -> tuple[msgspec.Raw, ...]:
    """The entries of a `/v1/health/connect` answer as raw JSON, or `ShapeError`.

    The whole body is parsed (it must be valid JSON and a list) but no entry is built: each
    `Raw` is a view of its entry's bytes in `body` (and keeps `body` alive while held).
    `decode_entry` turns one into a `HealthEntry`.
    """
    try:
        return _entries.decode(body)
    except msgspec.ValidationError as exc:
        raise ShapeError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ShapeError(f"response is not JSON: {exc}") from None
    except RecursionError:
        # Nesting deeper than the interpreter's limit, e.g. inside a field we skip.
        raise ShapeError("response is not JSON this agent reads: nested too deeply") from None


def decode_entry(raw: msgspec.Raw | bytes, position: int) -> HealthEntry:
    """Entry number `position` of the answer, or `ShapeError` naming its JSON path
    (`$[12].Service.Port`)."""
    try:
        return _entry.decode(raw)
    except msgspec.ValidationError as exc:
        # msgspec names the path within the entry (`$.Service.Port`), or none at its top.
        text = str(exc)
        where = f"$[{position}]"
        if " - at `$" in text:
            raise ShapeError(text.replace(" - at `$", f" - at `{where}", 1)) from None
        raise ShapeError(f"{text} - at `{where}`") from None
    except (msgspec.DecodeError, RecursionError) as exc:  # not after `split_entries`
        raise ShapeError(f"$[{position}] is not JSON this agent reads: {exc}") from None


def decode_entries(body: bytes) -> tuple[HealthEntry, ...]:
    """Every entry of a `/v1/health/connect` answer, or `ShapeError` saying what is wrong."""
    return tuple(decode_entry(raw, i) for i, raw in enumerate(split_entries(body)))


__all__ = [
    "CheckFields",
    "ConnectFields",
    "HealthEntry",
    "NodeFields",
    "ProxyFields",
    "ServiceFields",
    "WeightsFields",
    "decode_entries",
    "decode_entry",
    "split_entries",
]
