"""Authorizers over the intentions engine (and the allow-all pair for benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from connect.seams import ConnectionAuthorizer, Peer, RequestAuthorizer, Verdict
from intentions.engine import HTTPRequest, Identity, Snapshot, http_request
from intentions.errors import BadRequest

__all__ = ["allow_all", "intentions_authorizers"]


def intentions_authorizers(
    snapshot: Callable[[], Snapshot], destination: Identity
) -> tuple[ConnectionAuthorizer, RequestAuthorizer]:
    """Authorizers over the engine's current snapshot for one local destination service.

    A request builds the engine's `HTTPRequest` only when the deciding intention has L7
    permissions; otherwise the connection-level decision answers. The target comes normalized
    by the listener, so it is matched as it is: normalizing again could only make the decision
    differ from what the app receives.

    A plaintext caller (`PLAINTEXT`, MutualTLSMode permissive) is matched only by intentions
    whose source is `*`, and where none of them decides (no such intention, or none of its
    permissions matches the request) it is denied whatever the default policy: the default
    is for mesh identities, and plaintext has none.
    """

    def connection(peer: Peer) -> Verdict:
        if peer.plaintext:
            policy = snapshot().for_destination(
                destination.name, destination.namespace, destination.partition
            )
            intention = policy.intention_for(peer.identity)
            return _PLAINTEXT_DEFAULT if intention is None else intention.connection
        return snapshot().decide_connection(destination, peer.identity)

    def request(
        peer: Peer,
        method: bytes,
        path: bytes,
        host: bytes,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> Verdict:
        policy = snapshot().for_destination(
            destination.name, destination.namespace, destination.partition
        )
        intention = policy.intention_for(peer.identity)
        if intention is None:
            return _PLAINTEXT_DEFAULT if peer.plaintext else policy.default
        if intention.permissions is None:
            return intention.connection
        try:
            # Without the fields: the engine's checks of method and path, and the
            # pseudo-headers. The fields are decoded only if a permission reads one.
            bare = http_request(
                method.decode("latin-1"),
                path.decode("latin-1"),
                host.decode("latin-1"),
                normalize=False,
            )
        except BadRequest as err:
            return _Refused(f"bad request: {err}")
        req = HTTPRequest(
            bare.method, bare.path, bare.url_path, _RequestFields(headers, bare.headers)
        )
        if peer.plaintext:
            for matches, decision in intention.permissions:
                if matches(req):
                    return decision
            return _Refused(f"{_PLAINTEXT_DEFAULT.reason}: no permission of {intention.display}")
        return policy.decide_request(peer.identity, req)

    return connection, request


class _RequestFields(Mapping[str, str]):
    """`HTTPRequest.headers` as `http_request` builds it (lower-case names, repeated fields
    joined with `,`, the pseudo-headers over any field of the same name), made on first
    use: most permissions match method and path only, and decoding every field of every
    request for them was the largest part of an L7 decision."""

    __slots__ = ("_fields", "_joined", "_pseudo")

    def __init__(self, fields: Sequence[tuple[bytes, bytes]], pseudo: Mapping[str, str]) -> None:
        self._fields = fields
        self._pseudo = pseudo
        self._joined: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        joined = self._joined
        if joined is None:
            merged: dict[str, list[str]] = {}
            for name, value in self._fields:
                key = name.decode("latin-1").lower()
                merged.setdefault(key, []).append(value.decode("latin-1"))
            joined = {name: ",".join(values) for name, values in merged.items()}
            joined.update(self._pseudo)
            self._joined = joined
        return joined

    def __getitem__(self, name: str) -> str:
        return self._all()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._all().get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


@dataclass(frozen=True, slots=True)
class _Refused:
    reason: str
    allowed: bool = False


_PLAINTEXT_DEFAULT = _Refused(
    "plaintext (no identity): denied unless an intention whose source is * allows it"
)


def allow_all() -> tuple[ConnectionAuthorizer, RequestAuthorizer]:
    """Authorizers that allow everything (benchmarks of the bare data path, tests)."""
    verdict = _Allowed()
    return (lambda peer: verdict), (lambda peer, m, p, h, hs: verdict)


@dataclass(frozen=True, slots=True)
class _Allowed:
    reason: str = "allowed"
    allowed: bool = True
