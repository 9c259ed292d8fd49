"""Where requests go: `AppOrigin` (inbound: the local app, plain TCP) or `MeshOrigin`
(outbound: a cluster's endpoints, dialed with mTLS and identity-checked, connect.dial). An
origin answers `acquire` at once from its pool, or starts a dial and later calls
`down.attach(ex, conn)` or `down.refuse(ex, response)`."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from connect.balancer import Policy, Target, request_hash
from connect.cluster import Outcome
from connect.dial import DialFailed, Upstream, dial_upstream
from connect.http1.exchange import Exchange
from connect.http1.limits import HTTPLimits
from connect.http1.upstream import Pool, UpConn
from connect.http1_headers import RETRY_ANY, bad_gateway, unavailable
from connect.stats import ProxyStats

if TYPE_CHECKING:
    from connect.http1.downstream import Downstream

__all__ = ["AppOrigin", "MeshOrigin", "Origin"]


class Origin:
    """Where requests go. `acquire` answers at once from the pool, or starts a dial and
    later calls `down.attach(conn)` or `down.refuse(response)`."""

    def __init__(self, limits: HTTPLimits) -> None:
        self.limits = limits
        self.pool = Pool(limits.high_water, limits.max_idle_per_endpoint)
        self.pools = [self.pool]
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        # Looked up once: get_running_loop() costs a getpid() syscall per call on 3.11.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def acquire(self, down: Downstream, ex: Exchange, avoid: str | None) -> UpConn | None:
        raise NotImplementedError

    def release(self, conn: UpConn, reusable: bool, outcome: Outcome = Outcome.SUCCESS) -> None:
        """Done with `conn` for one exchange, which ended as `outcome` (mesh endpoints learn
        from it: connect.cluster)."""
        if reusable:
            conn.pool.put(conn)
        else:
            conn.owner = None
            if conn.transport is not None:
                conn.transport.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks)
        for pool in self.pools:
            pool.close()


class AppOrigin(Origin):
    """The local application, over plain TCP on loopback (inbound side)."""

    def __init__(self, host: str, port: int, limits: HTTPLimits) -> None:
        super().__init__(limits)
        self.host = host
        self.port = port
        self.key = f"{host}:{port}"

    def acquire(self, down: Downstream, ex: Exchange, avoid: str | None) -> UpConn | None:
        # A retry (avoid set) dials afresh: the other pooled connections to an app that just
        # dropped one are likely dead too, and their close may not have been read yet.
        conn = self.pool.take(self.key) if avoid is None else None
        if conn is not None:
            return conn
        self._spawn(self._dial(down, ex))
        return None

    async def _dial(self, down: Downstream, ex: Exchange) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpConn(self.pool, self.key, None), self.host, self.port
                ),
                self.limits.connect_timeout,
            )
        except (OSError, TimeoutError) as err:
            reason = f"local app: {type(err).__name__}"
            down.refuse(ex, bad_gateway(reason, close=True, retriable=RETRY_ANY))
            return
        down.attach(ex, conn)


class MeshOrigin(Origin):
    """Upstream clusters by name, each dialed with mTLS per endpoint (outbound side); the
    exchange's route named its cluster. A name may stand for a failover chain: its clusters
    are tried in order (connect.dial.dial_failover's rules). Idle connections are pooled
    per cluster."""

    def __init__(
        self,
        upstream: Upstream,
        limits: HTTPLimits,
        stats: ProxyStats,
        clusters: Mapping[str, Upstream | Sequence[Upstream]] | None = None,
    ) -> None:
        super().__init__(limits)
        self.upstream = upstream
        self.stats = stats
        pools: dict[int, Pool] = {id(upstream): self.pool}
        self.named: dict[str, tuple[tuple[Upstream, Pool], ...]] = {}
        """Cluster name -> its upstreams (the primary, then failover) with their idle pools."""
        for name, ups in (clusters or {upstream.name: upstream}).items():
            chain = (ups,) if isinstance(ups, Upstream) else tuple(ups)
            if not chain:
                raise ValueError(f"cluster {name!r}: no upstream")
            links = []
            for up in chain:
                pool = pools.get(id(up))
                if pool is None:
                    pool = pools[id(up)] = Pool(limits.high_water, limits.max_idle_per_endpoint)
                    self.pools.append(pool)
                links.append((up, pool))
            self.named[name] = tuple(links)

    def acquire(self, down: Downstream, ex: Exchange, avoid: str | None) -> UpConn | None:
        name = ex.cluster or self.upstream.name
        chain = self.named.get(name)
        if chain is None:
            self.stats.no_endpoint += 1
            down.refuse(ex, unavailable(f"no cluster {name!r}", close=False))
            return None
        now = (self._loop or self.loop).time()
        last = len(chain) - 1
        primary = chain[0][0].cluster
        if primary.limited and self._overflow(down, ex, primary.admit()):
            return None
        for i, (up, pool) in enumerate(chain):
            cluster = up.cluster
            h = None
            balancer = cluster.endpoints.balancer()  # (choose swaps the cursor if it is new)
            if balancer.uses_hash and balancer.config.hash_policies:
                h = request_hash(balancer.config.hash_policies, _HeaderLookup(ex.headers))
            if avoid is None:
                target = cluster.choose(now, up.rng, h, panic=i == last)
            else:
                target = cluster.choose(now, up.rng, h, (avoid,), panic=i == last)
                if target is None and i == last:
                    target = cluster.choose(now, up.rng, h)  # the only endpoint: a new connection
            if target is None:
                continue
            conn = pool.take(target.key)
            if conn is not None:
                conn.target = target
                return conn
            if cluster.limited:
                over = cluster.admit(request=False, new_connection=True, dial=True)
                if over is not None:
                    cluster.record(target, Outcome.CANCELLED, now)
                    self._overflow(down, ex, over)
                    return None
            avoided = () if avoid is None else (avoid,)
            self._spawn(self._dial(down, ex, chain[i:], first=target, avoid=avoided, h=h))
            return None
        self.stats.no_endpoint += 1
        down.refuse(ex, unavailable("no healthy endpoint", close=False))
        return None

    async def _dial(
        self,
        down: Downstream,
        ex: Exchange,
        chain: tuple[tuple[Upstream, Pool], ...],
        *,
        first: Target,
        avoid: tuple[str, ...],
        h: int | None,
    ) -> None:
        waiting = chain[0][0].cluster
        waiting.pending += 1
        try:
            await self._dial_chain(down, ex, chain, first=first, avoid=avoid, h=h)
        finally:
            waiting.pending -= 1

    async def _dial_chain(
        self,
        down: Downstream,
        ex: Exchange,
        chain: tuple[tuple[Upstream, Pool], ...],
        *,
        first: Target,
        avoid: tuple[str, ...],
        h: int | None,
    ) -> None:
        reason = "no healthy endpoint"
        for j, (up, pool) in enumerate(chain):
            try:
                _, conn, _ = await dial_upstream(
                    up,
                    partial(_connection, pool),
                    request_hash=h if j == 0 else _hash_of(up, ex),
                    avoid=avoid if j == 0 else (),
                    first=first if j == 0 else None,
                    on_failure=self._dial_failed,
                    panic=j == len(chain) - 1,
                )
            except DialFailed as err:
                reason = str(err)
                continue
            # Counted from here (a dial that failed its identity check never was).
            conn.cluster = up.cluster
            up.cluster.connections += 1
            down.attach(ex, conn)
            return
        self.stats.no_endpoint += 1
        down.refuse(ex, unavailable(reason, close=False))

    def _overflow(self, down: Downstream, ex: Exchange, over: str | None) -> bool:
        if over is None:
            return False
        self.stats.no_endpoint += 1
        down.refuse(ex, unavailable(f"circuit breaker: {over}", close=False))
        return True

    def _dial_failed(self) -> None:
        self.stats.upstream_failures += 1

    def release(self, conn: UpConn, reusable: bool, outcome: Outcome = Outcome.SUCCESS) -> None:
        target = conn.target
        if target is not None and conn.cluster is not None:
            conn.target = None
            if outcome is Outcome.REFUSED:
                self.stats.upstream_failures += 1
            conn.cluster.record(target, outcome, (self._loop or self.loop).time())
        super().release(conn, reusable, outcome)


def _hash_of(up: Upstream, ex: Exchange) -> int | None:
    config = up.cluster.balancer().config
    if config.hash_policies and config.policy in _HASHED:
        return request_hash(config.hash_policies, _HeaderLookup(ex.headers))
    return None


_HASHED = frozenset({Policy.RING_HASH, Policy.MAGLEV})


def _connection(pool: Pool, target: Target) -> UpConn:
    return UpConn(pool, target.key, target)


class _HeaderLookup:
    """Lower-case header lookup for hash policies, decoded only when a policy asks."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    def __call__(self, name: str) -> str | None:
        wanted = name.encode()
        values = [v.decode("latin-1") for n, v in self.headers if n.lower() == wanted]
        return ",".join(values) if values else None
