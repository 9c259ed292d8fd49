"""Where requests go: `AppOrigin` (inbound: the local app, plain TCP) or `MeshOrigin`
(outbound: a cluster's endpoints, dialed with mTLS and identity-checked, connect.dial). An
origin answers `acquire` at once from its pool, or starts a dial and later calls
`down.attach(ex, conn)` or `down.refuse(ex, response)`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from connect.balancer import HashPolicy, Policy, Target, request_hash
from connect.cluster import WAIT, Cluster, Outcome
from connect.dial import DialFailed, Upstream, dial_upstream
from connect.http1.exchange import Exchange
from connect.http1.limits import HTTPLimits
from connect.http1.mirror import Mirrors
from connect.http1.upstream import Pool, UpConn
from connect.http1_headers import RETRY_ANY, bad_gateway, unavailable
from connect.routes import shadow_head
from connect.stats import ProxyStats

if TYPE_CHECKING:
    from connect.http1.downstream import Downstream

__all__ = ["AppOrigin", "MeshOrigin", "Origin"]

_Waiter = tuple["Downstream", Exchange]


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

    def mirror(self, ex: Exchange) -> None:
        """Send a copy of `ex` to the cluster its route mirrors to (outbound only)."""

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
        self.connect_timeout = limits.connect_timeout
        """Seconds to connect to the app: `local_connect_timeout_ms`, changed in place
        (connect.local_app); a dial already under way keeps the one it started with."""

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
                self.connect_timeout,
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
        self.mirrors = Mirrors()
        """The copies of mirrored routes (connect.http1.mirror)."""
        self.queued: dict[Cluster, deque[_Waiter]] = {}
        """Per cluster at `max_connections`: requests waiting for a connection (pending)."""
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

    def set_clusters(self, clusters: Mapping[str, Sequence[Upstream]]) -> None:
        """Swap the named clusters whole (a new routing snapshot). An upstream object kept
        from before keeps its idle pool; the pools of those gone close their idle
        connections (busy ones finish and are not pooled again)."""
        by_id = {id(up): pool for chain in self.named.values() for up, pool in chain}
        named: dict[str, tuple[tuple[Upstream, Pool], ...]] = {}
        kept: dict[int, Pool] = {}
        for name, chain in clusters.items():
            if not chain:
                raise ValueError(f"cluster {name!r}: no upstream")
            links = []
            for up in chain:
                pool = kept.get(id(up)) or by_id.get(id(up))
                if pool is None:
                    pool = Pool(self.limits.high_water, self.limits.max_idle_per_endpoint)
                kept[id(up)] = pool
                links.append((up, pool))
            named[name] = tuple(links)
        for pool in {id(p): p for p in self.pools}.values():
            if pool not in kept.values() and pool is not self.pool:
                pool.close()
        self.pools = [self.pool, *(p for p in kept.values() if p is not self.pool)]
        self.named = named

    def endpoints_changed(self) -> int:
        """Some cluster's endpoint set changed: each pool keeps idle connections only to
        endpoints of its cluster's current set; returns how many were closed."""
        closed = 0
        seen: set[int] = set()
        for chain in self.named.values():
            for up, pool in chain:
                if id(pool) not in seen:
                    seen.add(id(pool))
                    closed += pool.retain([t.key for t in up.endpoints.balancer().targets])
        return closed

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
                h = _request_hash(balancer.config.hash_policies, ex, down)
            avoided: tuple[str, ...] = ()
            if avoid is None:
                target = cluster.choose(now, up.rng, h, panic=i == last)
            else:
                avoided = ex.tried or (avoid,)
                target = cluster.choose(now, up.rng, h, avoided, panic=i == last)
                if target is None and len(avoided) > 1:
                    avoided = (avoid,)  # every other endpoint was tried: any but the last
                    target = cluster.choose(now, up.rng, h, avoided, panic=i == last)
                if target is None and i == last:
                    avoided = ()
                    target = cluster.choose(now, up.rng, h)  # the only endpoint: a new connection
            if target is None:
                continue
            conn = pool.take(target.key)
            if conn is not None:
                conn.target = target
                return conn
            if cluster.limited:
                if self.queued.get(cluster):
                    self._purge(cluster)
                over = cluster.admit_dial()
                if over is not None:
                    cluster.record(target, Outcome.CANCELLED, now)
                    if over == WAIT:
                        # Envoy's pending request: it gets the next connection released.
                        cluster.pending += 1
                        self.queued.setdefault(cluster, deque()).append((down, ex))
                    else:
                        self._overflow(down, ex, over)
                    return None
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
                    request_hash=h if j == 0 else _hash_of(up, ex, down),
                    avoid=avoid if j == 0 else (),
                    first=first if j == 0 else None,
                    on_failure=self._dial_failed,
                    panic=j == len(chain) - 1,
                )
            except DialFailed as err:
                reason = str(err)
                ex.flags = "UF"  # Envoy's: endpoints were there, connecting to them failed
                continue
            if ex.flags == "UF":
                ex.flags = "-"  # failed over: this one connected
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
        ex.flags = "UO"
        down.refuse(ex, unavailable(f"circuit breaker: {over}", close=False))
        return True

    def _dial_failed(self) -> None:
        self.stats.upstream_failures += 1

    def release(self, conn: UpConn, reusable: bool, outcome: Outcome = Outcome.SUCCESS) -> None:
        target = conn.target
        cluster = conn.cluster
        if target is not None and cluster is not None:
            conn.target = None
            if outcome is Outcome.REFUSED:
                self.stats.upstream_failures += 1
            cluster.record(target, outcome, (self._loop or self.loop).time())
        if cluster is not None and self.queued.get(cluster):
            self._serve_pending(cluster, conn, reusable, target)
            return
        super().release(conn, reusable, outcome)

    def _purge(self, cluster: Cluster) -> None:
        """Drop the pending requests already answered (a timeout) or gone (the client)."""
        queue = self.queued[cluster]
        live = deque(w for w in queue if _waiting(*w))
        cluster.pending -= len(queue) - len(live)
        self.queued[cluster] = live

    def _serve_pending(
        self, cluster: Cluster, conn: UpConn, reusable: bool, target: Target | None
    ) -> None:
        """A connection of `cluster` is released while requests wait for one: the first
        waiting gets it, or, when it cannot be reused, its place (it closes now and the
        waiting request dials)."""
        queue = self.queued[cluster]
        waiter = None
        while queue and waiter is None:
            cluster.pending -= 1
            w = queue.popleft()
            if _waiting(*w):
                waiter = w
        if waiter is None:
            super().release(conn, reusable)
            return
        down, ex = waiter
        transport = conn.transport
        pool = conn.pool
        if (
            reusable
            and target is not None
            and transport is not None
            and not transport.is_closing()
            and (pool.keys is None or conn.key in pool.keys)
        ):
            cluster.claim(target)
            conn.target = target
            conn.owner = None
            down.attach(ex, conn)
            return
        if transport is not None:
            # Closed here, so its slot is free now (connection_lost will not count it again).
            cluster.connections -= 1
            conn.cluster = None
        super().release(conn, reusable=False)
        again = self.acquire(down, ex, None)
        if again is not None:
            down.attach(ex, again)

    def mirror(self, ex: Exchange) -> None:
        """Send the copy of a mirrored request (its route chose `ex.mirror`), once it has been
        read whole: its body only if it was kept (within the replay bound)."""
        chain = self.named.get(ex.mirror)
        if chain is None or (ex.has_body and (ex.kept is None or not ex.body_done)):
            self.mirrors.skip()
            return
        parts = [shadow_head(ex.head)]
        for chunk in ex.kept or ():
            parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n") if ex.framing.chunked else (chunk,)
        if ex.framing.chunked:
            parts.append(b"0\r\n\r\n")
        self.mirrors.send([up for up, _ in chain], parts)

    async def close(self) -> None:
        await self.mirrors.close()
        await super().close()


def _waiting(down: Downstream, ex: Exchange) -> bool:
    """A pending request still waits: its client is there and it is unanswered."""
    return (
        down.transport is not None and bool(down.queue) and down.queue[0] is ex and ex.conn is None
    )


def _hash_of(up: Upstream, ex: Exchange, down: Downstream) -> int | None:
    config = up.cluster.balancer().config
    if config.hash_policies and config.policy in _HASHED:
        return _request_hash(config.hash_policies, ex, down)
    return None


def _request_hash(policies: Sequence[HashPolicy], ex: Exchange, down: Downstream) -> int | None:
    """The request's affinity hash: headers and cookies, the query parameters of the target
    as forwarded, the client's address (the local app's, for an outbound listener)."""
    source_ip = None
    if any(hp.source_ip for hp in policies) and down.transport is not None:
        peer = down.transport.get_extra_info("peername")
        source_ip = peer[0] if isinstance(peer, tuple) else None
    connection = None
    cookies: list[bytes] | None = None
    if down.transport is not None and any(hp.cookie_ttl is not None for hp in policies):
        # A generated cookie is derived from the client connection's two addresses.
        t = down.transport
        connection = f"{t.get_extra_info('peername')}{t.get_extra_info('sockname')}"
        cookies = []
    h = request_hash(
        policies,
        _HeaderLookup(ex.headers),
        source_ip,
        _QueryLookup(ex.head),
        connection=connection,
        set_cookies=cookies,
    )
    if cookies:
        ex.set_cookies = tuple(cookies)
    return h


class _QueryLookup:
    """The first value of a query parameter of the request line, decoded only when asked."""

    __slots__ = ("head",)

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __call__(self, name: str) -> str | None:
        line = self.head[: self.head.find(b"\r\n")]
        target = line.split(b" ", 2)[1] if line.count(b" ") >= 2 else b""
        _, _, query = target.partition(b"?")
        wanted = name.encode()
        for part in query.split(b"&"):
            key, _, value = part.partition(b"=")
            if unquote_to_bytes(key) == wanted:
                return unquote_to_bytes(value).decode("latin-1")
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
