"""Leaves and roots from Consul's agent: `/v1/agent/connect/ca/leaf/:service` and `/ca/roots`.

Both are blocking queries. The agent decides when a leaf must be replaced (its soft expiry,
60-90 % of the lifetime, or a root rotation) and answers a query parked on the current leaf's
ModifyIndex then, so this source is `blocking`: the rotator simply calls it again and again.

connect does not import the agent's Consul client (the agent imports connect); the composition
root passes in the client's `connect` group and says which of its exceptions mean "try again"
and which mean "refused".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from connect.leaf import Leaf, LeafError, SourceRejected, SourceUnavailable, TrustBundle

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

# The agent caps a blocking query at 10 minutes; ask for less so a silently dead connection
# is noticed within a few minutes.
BLOCKING_WAIT = 300.0


class IndexedValue(Protocol[T_co]):
    @property
    def value(self) -> T_co: ...

    @property
    def next_index(self) -> int: ...


class ConsulConnectAPI(Protocol):
    async def leaf(
        self, service: str, *, index: int = 0, wait: float | str | None = None
    ) -> IndexedValue[Leaf]: ...

    async def ca_roots(
        self, *, index: int = 0, wait: float | str | None = None
    ) -> IndexedValue[TrustBundle]: ...


@dataclass(frozen=True)
class ErrorKinds:
    """Which client exceptions are worth retrying, and which are refusals."""

    unavailable: tuple[type[Exception], ...]
    rejected: tuple[type[Exception], ...]


async def _mapped(errors: ErrorKinds, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except LeafError:
        raise
    except errors.rejected as err:
        raise SourceRejected(str(err)) from err
    except errors.unavailable as err:
        raise SourceUnavailable(str(err)) from err
    except ValueError as err:
        # The client's shape errors: Consul answered, but not with a usable certificate.
        raise SourceUnavailable(f"unusable answer from Consul: {err}") from err


class ConsulLeafSource:
    name = "consul"
    blocking = True

    def __init__(
        self,
        api: ConsulConnectAPI,
        service: str,
        errors: ErrorKinds,
        *,
        wait: float = BLOCKING_WAIT,
    ) -> None:
        self._api = api
        self.service = service
        self._errors = errors
        self._wait = wait

    async def fetch(self, current: Leaf | None, bundle: TrustBundle) -> Leaf:
        """The current leaf at once (no `current`), else wait for the agent's next one; after
        the wait runs out this returns `current`'s twin, which the rotator ignores."""
        index = current.index if current is not None else 0
        got = await _mapped(
            self._errors,
            lambda: self._api.leaf(self.service, index=index, wait=self._wait if index else None),
        )
        return got.value


class ConsulRootsSource:
    def __init__(
        self, api: ConsulConnectAPI, errors: ErrorKinds, *, wait: float = BLOCKING_WAIT
    ) -> None:
        self._api = api
        self._errors = errors
        self._wait = wait

    async def roots(self, index: int) -> TrustBundle:
        got = await _mapped(
            self._errors,
            lambda: self._api.ca_roots(index=index, wait=self._wait if index else None),
        )
        bundle = got.value
        # The index to block on next travels with the bundle.
        return TrustBundle(
            trust_domain=bundle.trust_domain,
            active_root_id=bundle.active_root_id,
            active_subject=bundle.active_subject,
            roots_pem=bundle.roots_pem,
            index=got.next_index,
        )
