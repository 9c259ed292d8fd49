"""Stored `service-intentions` entries, as a Consul read returns them, into one engine snapshot.

This is the sidecar's path from `GET /v1/config/service-intentions` to enforcement. Each body
is read with the read-side rules (`entries.read_entry`: everything Consul returns, Legacy*
fields included, is accepted); a body that still cannot be read or compiled makes its own
destination deny everything (`engine.BrokenEntry`), and only that destination. Nothing here
keeps an earlier state of an entry: what the operator wrote is enforced, or refused loudly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from intentions.engine import BrokenEntry, Snapshot, compile_snapshot
from intentions.entries import DEFAULT, WILDCARD, ServiceIntentions, read_entry
from intentions.errors import EntryError


def _text(body: Mapping[object, object], key: str) -> str | None:
    value = next((v for k, v in body.items() if str(k).lower() == key.lower()), None)
    return value if isinstance(value, str) and value else None


def destination_of(body: object) -> tuple[str, str, str]:
    """(partition, namespace, name) a body is the entry of, read as leniently as possible.

    A body whose destination cannot be told (no string `Name`) could be the entry of any
    service: it is attributed to the partition's `*/*` entry, so it fails closed for all."""
    if not isinstance(body, Mapping):
        return DEFAULT, WILDCARD, WILDCARD
    partition = _text(body, "Partition") or DEFAULT
    name = _text(body, "Name")
    if name is None:
        return partition, WILDCARD, WILDCARD
    return partition, _text(body, "Namespace") or DEFAULT, name


def read_entries(
    bodies: Iterable[object],
) -> tuple[list[ServiceIntentions], list[BrokenEntry]]:
    """The entries that read, and one BrokenEntry (with Consul's error text) per body that
    did not."""
    good: list[ServiceIntentions] = []
    broken: list[BrokenEntry] = []
    for body in bodies:
        try:
            good.append(read_entry(body))
        except EntryError as exc:
            partition, namespace, name = destination_of(body)
            reason = _one_line(str(exc))
            broken.append(BrokenEntry(name, reason, namespace, partition))
    return good, broken


def _one_line(text: str) -> str:
    """Consul's decode errors span lines (a header, then one `* error` line each); a status
    line and a log line want `...: 2 errors occurred: a; b`."""
    lines = [line.strip().removeprefix("* ") for line in text.splitlines() if line.strip()]
    if len(lines) <= 1:
        return text.strip()
    return f"{lines[0]} {'; '.join(lines[1:])}"


def compile_stored(
    bodies: Iterable[object], *, default_allow: bool, default_reason: str
) -> Snapshot:
    """The snapshot that enforces `bodies`; `Snapshot.broken` lists the destinations that
    deny everything because their entry could not be read or compiled."""
    good, broken = read_entries(bodies)
    return compile_snapshot(
        good, default_allow=default_allow, default_reason=default_reason, broken=broken
    )


__all__ = ["compile_stored", "destination_of", "read_entries"]
