"""Load balancing over an immutable endpoint set, pure.

`compile_balancer` does the work when an endpoint snapshot or a service-resolver changes: it
builds the weighted round-robin schedule, the cumulative weights for random picks, the hash ring
or the maglev table. A pick is then an index into a tuple, a bisect, or two random draws.

Policies and their names are Consul's service-resolver `LoadBalancer.Policy` values. Nothing
here reads a clock or a global RNG: the caller passes its `random.Random`, its round-robin turn
and the in-flight counts it keeps (see `Cursor`), and a request's hash comes from `request_hash`.

Failover and outlier handling share one mechanism: `pick(..., exclude=...)` never returns an
index in `exclude`, and says None when every endpoint is excluded.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
import random
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Balancer",
    "BalancerConfig",
    "ConfigError",
    "Cursor",
    "HashPolicy",
    "Policy",
    "Target",
    "compile_balancer",
    "generated_cookie",
    "hash_key",
    "request_hash",
]


class ConfigError(ValueError):
    """A load-balancer configuration meshlet cannot apply; str() names the field."""


class Policy(enum.Enum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RANDOM = "random"
    RING_HASH = "ring_hash"
    MAGLEV = "maglev"


@dataclass(frozen=True, slots=True)
class Target:
    """One endpoint as the balancer sees it. `key` is stable across snapshots (node/service ID):
    hashing is over keys, not addresses, so an instance that moves keeps its keys."""

    key: str
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """Consul's `HashPolicies` entry: hash a header, a cookie, a query parameter or the
    source IP."""

    field: str = ""
    """"header", "cookie", "query_parameter" or "" (with `source_ip`)."""
    field_value: str = ""
    source_ip: bool = False
    terminal: bool = False
    cookie_ttl: float | None = None
    """A cookie policy's `CookieConfig`: when the request has no such cookie, one is made up
    and set on the response (Envoy's generated cookie), with `Max-Age` this many seconds, or
    a session cookie when 0. None: no cookie is generated (Consul sets Envoy's ttl only for
    `TTL` or `Session`)."""
    cookie_path: str = ""


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    policy: Policy = Policy.LEAST_REQUEST
    """Consul's default for meshlet, as the issue asks (Envoy's own default is round robin)."""
    choice_count: int = 2
    minimum_ring_size: int = 1024
    maximum_ring_size: int = 8_388_608
    maglev_table_size: int = 65537
    hash_policies: tuple[HashPolicy, ...] = ()

    def __post_init__(self) -> None:
        if self.choice_count < 2:
            raise ConfigError("LeastRequestConfig.ChoiceCount must be at least 2")
        if not 1 <= self.minimum_ring_size <= self.maximum_ring_size:
            raise ConfigError("RingHashConfig.MinimumRingSize must be >= 1 and <= MaximumRingSize")
        if not _is_prime(self.maglev_table_size):
            raise ConfigError("maglev table size must be a prime")
        for hp in self.hash_policies:
            if hp.source_ip:
                if hp.field:
                    raise ConfigError("HashPolicies: SourceIP cannot be combined with Field")
            elif hp.field not in ("header", "cookie", "query_parameter"):
                raise ConfigError(
                    f"HashPolicies.Field {hp.field!r}: allowed values are header, cookie, "
                    "query_parameter"
                )
            elif not hp.field_value:
                raise ConfigError("HashPolicies.FieldValue is required with Field")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def _hash64(data: bytes) -> int:
    # Stable across processes (unlike hash()), so every sidecar agrees on the ring.
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def hash_key(value: str) -> int:
    """The 64-bit hash of a request's affinity value (header or cookie value, source IP)."""
    return _hash64(value.encode())


@dataclass(slots=True)
class Cursor:
    """The mutable per-upstream state a shell keeps beside one compiled Balancer: the
    round-robin turn and each endpoint's in-flight request count. A new Balancer for a new
    snapshot gets a new Cursor; carrying counts over by key is the shell's choice."""

    inflight: list[int]
    turn: int = 0

    @classmethod
    def for_balancer(cls, balancer: Balancer) -> Cursor:
        return cls([0] * len(balancer.targets))


@dataclass(frozen=True, slots=True)
class Balancer:
    targets: tuple[Target, ...]
    config: BalancerConfig
    schedule: tuple[int, ...] = field(repr=False)
    """Smooth weighted round-robin order; one full cycle."""
    cumulative: tuple[int, ...] = field(repr=False)
    ring_points: tuple[int, ...] = field(repr=False)
    ring_owners: tuple[int, ...] = field(repr=False)
    maglev: tuple[int, ...] = field(repr=False)
    weights: tuple[int, ...] = field(repr=False)

    uses_hash: bool = field(init=False, repr=False)
    """Ring hash or maglev: requests need a hash value."""

    def __post_init__(self) -> None:
        hashed = self.config.policy in (Policy.RING_HASH, Policy.MAGLEV)
        object.__setattr__(self, "uses_hash", hashed)

    def pick(
        self,
        cursor: Cursor,
        rng: random.Random,
        request_hash: int | None = None,
        exclude: Container[int] = (),
    ) -> int | None:
        """Index of the endpoint to use, or None when there is none outside `exclude`.

        For the hash policies a request without a hash value is balanced at random, as Envoy
        does. `cursor.turn` advances for round robin; in-flight counts are the caller's to keep.
        """
        n = len(self.targets)
        if n <= 1:
            return None if n == 0 or 0 in exclude else 0
        policy = self.config.policy
        if policy is Policy.ROUND_ROBIN:
            sched = self.schedule
            for _ in range(len(sched)):
                idx = sched[cursor.turn % len(sched)]
                cursor.turn += 1
                if idx not in exclude:
                    return idx
            return None
        if policy is Policy.LEAST_REQUEST:
            return self._least_request(cursor.inflight, rng, exclude)
        if request_hash is not None:
            if policy is Policy.RING_HASH:
                return self._ring_pick(request_hash, exclude)
            if policy is Policy.MAGLEV:
                return self._maglev_pick(request_hash, exclude)
        return self._random(rng, exclude)

    def _random(self, rng: random.Random, exclude: Container[int]) -> int | None:
        cum = self.cumulative
        idx = bisect.bisect_right(cum, rng.randrange(cum[-1]))
        if idx not in exclude:
            return idx
        allowed = [i for i in range(len(self.targets)) if i not in exclude]
        if not allowed:
            return None
        return rng.choices(allowed, weights=[self.weights[i] for i in allowed])[0]

    def _least_request(
        self, inflight: Sequence[int], rng: random.Random, exclude: Container[int]
    ) -> int | None:
        n = len(self.targets)
        weights = self.weights
        best = -1
        if n > 1:
            for _ in range(self.config.choice_count):
                c = rng.randrange(n)
                if c in exclude:
                    continue
                # Compare load per unit of weight without division: a/wa < b/wb.
                if best < 0 or inflight[c] * weights[best] < inflight[best] * weights[c]:
                    best = c
            if best >= 0:
                return best
        allowed = [i for i in range(n) if i not in exclude]
        if not allowed:
            return None
        return min(allowed, key=lambda i: (inflight[i] / weights[i], i))

    def _ring_pick(self, h: int, exclude: Container[int]) -> int | None:
        points, owners = self.ring_points, self.ring_owners
        start = bisect.bisect_left(points, h)
        size = len(points)
        for step in range(size):
            owner = owners[(start + step) % size]
            if owner not in exclude:
                return owner
        return None

    def _maglev_pick(self, h: int, exclude: Container[int]) -> int | None:
        table = self.maglev
        size = len(table)
        start = h % size
        for step in range(size):
            owner = table[(start + step) % size]
            if owner not in exclude:
                return owner
        return None


def _smooth_schedule(weights: Sequence[int]) -> tuple[int, ...]:
    """nginx's smooth weighted round robin, unrolled for one cycle at compile time."""
    total = sum(weights)
    current = [0] * len(weights)
    out: list[int] = []
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[best] -= total
        out.append(best)
    return tuple(out)


def _scaled_weights(targets: Sequence[Target], cap: int = 4096) -> tuple[int, ...]:
    # Consul weights go to 65535; reduce by the gcd and, if the cycle is still long, scale
    # down so the compiled schedule stays small (an endpoint never drops to zero).
    raw = [max(1, t.weight) for t in targets]
    g = 0
    for w in raw:
        g = math.gcd(g, w)
    raw = [w // g for w in raw]
    total = sum(raw)
    if total > cap:
        raw = [max(1, round(w * cap / total)) for w in raw]
    return tuple(raw)


def _ring(
    targets: Sequence[Target], weights: Sequence[int], config: BalancerConfig
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Envoy sizes the ring as a whole (MinimumRingSize / total weight points per unit), so
    # adding an endpoint shrinks everyone's share of points and also moves keys between the
    # old endpoints. Here an endpoint's points depend only on its own key and weight
    # (MinimumRingSize / 8 per unit: the minimum is reached at eight endpoints), so adding one
    # moves keys only to it.
    total = sum(weights)
    per_unit = max(1, math.ceil(config.minimum_ring_size / 8))
    if total * per_unit > config.maximum_ring_size:
        per_unit = max(1, config.maximum_ring_size // total)
    points: list[tuple[int, int]] = []
    for idx, (target, w) in enumerate(zip(targets, weights, strict=True)):
        prefix = target.key.encode() + b"_"
        for r in range(w * per_unit):
            points.append((_hash64(prefix + str(r).encode()), idx))
    points.sort()
    return tuple(p for p, _ in points), tuple(o for _, o in points)


def _maglev_table(targets: Sequence[Target], weights: Sequence[int], size: int) -> tuple[int, ...]:
    """Maglev population (Eisenbud et al. 2016, §3.4) with weights as fill credits."""
    n = len(targets)
    offsets: list[int] = []
    skips: list[int] = []
    for t in targets:
        key = t.key.encode()
        offsets.append(_hash64(b"offset:" + key) % size)
        skips.append(_hash64(b"skip:" + key) % (size - 1) + 1)
    nexts = [0] * n
    table = [-1] * size
    max_w = max(weights)
    credit = [0] * n
    filled = 0
    while True:
        for i in range(n):
            credit[i] += weights[i]
            if credit[i] < max_w:
                continue
            credit[i] -= max_w
            c = (offsets[i] + nexts[i] * skips[i]) % size
            while table[c] >= 0:
                nexts[i] += 1
                c = (offsets[i] + nexts[i] * skips[i]) % size
            table[c] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                return tuple(table)


def compile_balancer(targets: Sequence[Target], config: BalancerConfig) -> Balancer:
    """Compile a balancer; targets are sorted by key so equal sets compile equal."""
    ordered = tuple(sorted(targets, key=lambda t: t.key))
    keys = [t.key for t in ordered]
    if len(set(keys)) != len(keys):
        raise ConfigError("endpoint keys must be unique")
    if not ordered:
        return Balancer((), config, (), (), (), (), (), ())
    weights = _scaled_weights(ordered)
    cumulative: list[int] = []
    acc = 0
    for w in weights:
        acc += w
        cumulative.append(acc)
    schedule = _smooth_schedule(weights) if config.policy is Policy.ROUND_ROBIN else ()
    points: tuple[int, ...] = ()
    owners: tuple[int, ...] = ()
    if config.policy is Policy.RING_HASH:
        points, owners = _ring(ordered, weights, config)
    maglev: tuple[int, ...] = ()
    if config.policy is Policy.MAGLEV:
        maglev = _maglev_table(ordered, weights, config.maglev_table_size)
    return Balancer(ordered, config, schedule, tuple(cumulative), points, owners, maglev, weights)


def _cookie_value(cookie_header: str, name: str) -> str | None:
    for part in cookie_header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            # A quoted value is its content (RFC 6265 §4.1.1), as Envoy parses it: the
            # cookie the proxy generates is quoted.
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            return v
    return None


def generated_cookie(hp: HashPolicy, connection: str) -> tuple[str, bytes]:
    """(value, Set-Cookie field value) of the cookie `hp` generates for a request that has
    none: the value is a hash of the client connection's addresses (so one connection's
    requests, racing before the first answer, get the same one), as Envoy makes it; the
    field says `name="value"`, `Max-Age` unless a session cookie, `Path` if set, HttpOnly."""
    value = f"{hash_key(connection):016x}"
    out = f'{hp.field_value}="{value}"'
    if hp.cookie_ttl:
        out += f"; Max-Age={int(hp.cookie_ttl)}"
    if hp.cookie_path:
        out += f"; Path={hp.cookie_path}"
    return value, (out + "; HttpOnly").encode("latin-1")


def request_hash(
    policies: Sequence[HashPolicy],
    header: Callable[[str], str | None] | Mapping[str, str],
    source_ip: str | None = None,
    query: Callable[[str], str | None] | None = None,
    *,
    connection: str | None = None,
    set_cookies: list[bytes] | None = None,
) -> int | None:
    """Combine the hash policies' values as Envoy does: each present value is folded in, a
    `terminal` policy that produced a value stops the walk; no value at all means None.

    `header` looks up a lower-case header name (repeated headers joined with ",");
    `query` the first value of a query parameter (percent-decoded). A cookie policy with a
    `cookie_ttl` whose cookie is missing generates one (`generated_cookie`) from
    `connection` (the client's addresses) and appends its Set-Cookie value to `set_cookies`.
    """
    get = header.get if isinstance(header, Mapping) else header
    combined: int | None = None
    for hp in policies:
        value: str | None
        if hp.source_ip:
            value = source_ip
        elif hp.field == "header":
            value = get(hp.field_value.lower())
        elif hp.field == "query_parameter":
            value = query(hp.field_value) if query is not None else None
        else:
            cookies = get("cookie")
            value = None if cookies is None else _cookie_value(cookies, hp.field_value)
            if value is None and hp.cookie_ttl is not None and set_cookies is not None:
                value, set_cookie = generated_cookie(hp, connection or "")
                set_cookies.append(set_cookie)
        if value is None:
            continue
        h = hash_key(value)
        # Rotate-and-xor keeps the fold order-sensitive and stays in 64 bits.
        combined = (
            h if combined is None else (((combined << 1) | (combined >> 63)) ^ h) & ((1 << 64) - 1)
        )
        if hp.terminal:
            break
    return combined
