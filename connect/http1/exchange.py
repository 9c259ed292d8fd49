"""One request and its response, as a state with decisions that return actions. Pure: no
sockets, no clock, no parser (h11's habit: the shell feeds events, the core says what to do).

The downstream protocol (connect.http1.downstream) turns parser callbacks and upstream events
into calls here and carries out what comes back:

    on_denied()                                        -> Answer
    on_response_head(status, retriable, may_redo, key) -> FORWARD | Retry
    on_response_end(key)                               -> FINISH | Retry
    on_upstream_lost(key, signal_retriable)            -> FINISH | CLOSE | Retry | Answer
    on_timeout(key, try_only)                          -> Answer | CLOSE | Retry
    on_idle()                                          -> Answer | CLOSE

`key` is the endpoint of the current try (the one a Retry avoids). After each decision
`outcome` says how the try went for that endpoint (connect.cluster.Outcome), which the shell
records in the endpoint's cluster.

Actions:

* `FORWARD`: send the response on to the client as it comes.
* `FINISH`: the response is complete (a close delimited it, or it ended normally).
* `CLOSE`: nothing clean can be said (part of a response is out): abort the client.
* `Answer(response)`: answer the client with these bytes instead of an upstream's.
* `Retry(avoid)`: send the request again, to another endpoint than `avoid` where one exists.
  `Retry` from `on_response_head` means "swallow this answer and retry once it has ended";
  the shell keeps reading it off the connection, then calls `on_response_end`.

When a retry is allowed is the route's `RetryPolicy` (connect.routes: a count and
conditions), so `NumRetries: 3` with `RetryOnStatusCodes` fits where the proxy's built-in
rules (the default policy) are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from connect.cluster import Outcome
from connect.http1_headers import (
    FORBIDDEN,
    FORBIDDEN_CLOSE,
    GATEWAY_TIMEOUT,
    RETRY_ANY,
    RETRY_IDEMPOTENT,
    STREAM_TIMEOUT,
    Framing,
    bad_gateway,
)
from connect.routes import DEFAULT_RETRY, NO_EDITS, HeaderEdits, RetryPolicy, RouteAction

if TYPE_CHECKING:
    import asyncio

    from connect.http1.upstream import UpConn
    from connect.seams import Verdict
    from connect.tracing import OpenSpan

__all__ = [
    "CLOSE",
    "FINISH",
    "FORWARD",
    "IDEMPOTENT",
    "Answer",
    "Close",
    "Exchange",
    "Finish",
    "Forward",
    "Retry",
]

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the upstream's response on to the client."""


@dataclass(frozen=True, slots=True)
class Finish:
    """The response is complete."""


@dataclass(frozen=True, slots=True)
class Close:
    """Abort the client connection: part of a response is out, nothing clean can follow."""


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer the client with `response` (a whole HTTP/1.1 message) instead."""

    response: bytes


@dataclass(frozen=True, slots=True)
class Retry:
    """Send the request again, avoiding the endpoint `avoid` where another exists."""

    avoid: str


FORWARD = Forward()
FINISH = Finish()
CLOSE = Close()

Action = Forward | Finish | Close | Answer | Retry


class Exchange:
    """One request and its response. Only what every request needs is set per instance; the
    rest are class defaults an exchange overrides when it gets there (cheaper than twenty
    slot stores per request)."""

    body_done = False
    conn: UpConn | None = None
    """The upstream connection carrying it, if any."""
    declined_keeps = False
    """An upgrade request whose client would keep the connection: it is kept after all if
    the upstream declines the upgrade (any answer but 101) and keeps its own."""
    denied = False
    expect = False
    pending: list[bytes] | None = None
    """Body bytes read before an upstream connection was attached."""
    kept: list[bytes] | None = None
    """The body as sent so far, while it fits the replay bound (None: not kept)."""
    kept_room = 0
    """Bytes the kept body may still grow by."""
    redo = False
    """The upstream's answer is being swallowed: the request goes again once it ends."""
    resp_chunked = False
    resp_started = False
    resp_until_close = False
    tries = 1
    """Tries so far, this one included."""
    tried: tuple[str, ...] = ()
    """Endpoints of the tries that were retried: a retry goes to one not among them where
    one exists, else to one other than the last."""
    outcome = Outcome.SUCCESS
    """How the current try went for its endpoint (connect.cluster), as far as known."""
    upgrade = b""
    retry: RetryPolicy = DEFAULT_RETRY
    """The route's retry policy (set only when it is not the default)."""
    cluster = ""
    """The cluster its route chose (outbound; empty: the origin's own)."""
    route: RouteAction | None = None
    """The route's action, when it has timeouts, response header edits, a fault or a mirror
    for the shell."""
    resp_edits: HeaderEdits = NO_EDITS
    """The response header edits of the route and the split leg it chose."""
    mirror = ""
    """The cluster a copy of this request goes to once it is read whole (empty: none)."""
    set_cookies: tuple[bytes, ...] = ()
    """Set-Cookie values the response gets: affinity cookies the balancer generated."""
    fault_delay = 0.0
    fault_abort = 0
    """The route's fault, decided with the head (`Fault.decide`): seconds to hold the
    request, and the status to answer instead of forwarding it (0: none)."""
    faulted = False
    """The route's fault delay is over (or there was none)."""
    stirred = False
    """A byte moved either way since the route's idle timer last looked."""
    idle: asyncio.TimerHandle | None = None
    """The shell's timer for the route's idle timeout, while it runs."""
    deadline: asyncio.TimerHandle | None = None
    """The shell's timer for the route's request timeout, while it runs."""
    deadline_due = False
    """The route's request timeout starts once the request has been read whole (Envoy's
    route timeout runs from the end of the request), and it has not been yet."""
    try_deadline: asyncio.TimerHandle | None = None
    """The shell's timer for the route's per-try timeout, or for the back-off before a
    retry (RetryPolicy.delay), while it runs."""
    try_due = False
    """The try under way waits for the end of the request to start its per-try timeout
    (Envoy starts it when the downstream request is complete, envoy#6643), so a slow upload
    is not cut by it."""
    start = 0.0
    """time.monotonic() when its head arrived; set (non-zero) only while the listener has an
    observer (connect.observe), which is then told about it when it is over."""
    rx = 0
    """Observed: request body bytes read from the client."""
    tx = 0
    """Observed: response body bytes sent back."""
    status = 0
    """Observed: the status of the answer the client got (0: none yet)."""
    flags = "-"
    """Observed: Envoy's response flags for how it went (connect.observe)."""
    verdict: Verdict | None = None
    """Observed: authorization's decision (inbound)."""
    upstream = ""
    """Observed: host:port (or endpoint key) of the upstream that answered."""
    response_headers: list[tuple[bytes, bytes]] | None = None
    """Observed: the response head's fields as the upstream sent them (for the observer's
    `response` call; set only while observed)."""
    grpc_status = "-"
    """Observed: a gRPC answer's grpc-status, when its head carries one (connect.observe)."""
    span: OpenSpan | None = None
    """Its trace span while one is open (sampled, tracing on: connect.tracing)."""

    def __init__(
        self,
        method: bytes,
        head: bytes,
        headers: list[tuple[bytes, bytes]],
        framing: Framing,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.head = head
        self.headers = headers
        self.framing = framing
        self.keep_alive = keep_alive
        self.idempotent = method in IDEMPOTENT
        self.is_head = method == b"HEAD"

    @property
    def has_body(self) -> bool:
        return self.framing.chunked or bool(self.framing.length)

    @property
    def replayable(self) -> bool:
        """Can be sent again as it is, and the policy has a try left: nothing of it is lost
        (no body, or a body read whole and kept within the bound), and an upgrade is never
        repeated."""
        return (
            self.tries <= self.retry.num_retries
            and not self.upgrade
            and (
                not (self.framing.chunked or self.framing.length)
                or (self.kept is not None and self.body_done)
            )
        )

    def keep(self, chunk: bytes) -> bool:
        """Keep a piece of the body being sent, or give up keeping past the bound (False)."""
        room = self.kept_room - len(chunk)
        if room < 0:
            self.kept = None
            return False
        self.kept_room = room
        assert self.kept is not None
        self.kept.append(chunk)
        return True

    def _retry(self, avoid: str) -> Retry:
        self.tries += 1
        if avoid not in self.tried:
            self.tried = (*self.tried, avoid)
        return Retry(avoid)

    def on_denied(self) -> Answer:
        """Authorization refused the request: the 403 to answer. The connection closes when
        the client may be holding its body for a 100 we will not send, or after an upgrade
        request (what follows it is not HTTP/1.1 we could read), and says so whenever the
        connection will not be kept."""
        if (self.expect and self.has_body) or self.upgrade or not self.keep_alive:
            self.keep_alive = False
            return Answer(FORBIDDEN_CLOSE)
        return Answer(FORBIDDEN)

    def on_response_head(self, status: int, retriable: bytes, may_redo: bool, key: str) -> Action:
        """The upstream's final response head arrived (from endpoint `key`). `retriable` is
        its x-meshlet-retriable value; `may_redo`: this listener honours it (outbound)."""
        policy = self.retry
        if not retriable and status not in policy.statuses:
            # The common case: nothing that could make it go again.
            self.outcome = Outcome.SERVER_ERROR if status >= 500 else Outcome.SUCCESS
            self.resp_started = True
            return FORWARD
        refused = (
            retriable
            and may_redo
            and (retriable == RETRY_ANY or (retriable == RETRY_IDEMPOTENT and self.idempotent))
        )
        if refused:
            self.outcome = Outcome.REFUSED
        elif status >= 500:
            self.outcome = Outcome.SERVER_ERROR
        else:
            self.outcome = Outcome.SUCCESS
        if self.replayable and ((refused and policy.on_refused) or policy.retries_status(status)):
            self.redo = True
            return Retry(key)  # counted as a try when it is made (on_response_end)
        self.resp_started = True
        return FORWARD

    def on_response_end(self, key: str) -> Action:
        """The response (or the swallowed one) has ended."""
        if self.redo:
            self.redo = False
            return self._retry(key)
        return FINISH

    def on_upstream_lost(self, key: str, signal_retriable: bool) -> Action:
        """The upstream connection (to endpoint `key`) closed during this exchange.
        `signal_retriable`: this is an inbound sidecar, whose 502 may tell the caller's
        sidecar to try another instance."""
        if self.resp_started:
            if self.resp_until_close:
                return FINISH  # the close delimited it
            self.outcome = Outcome.RESET
            return CLOSE
        if self.redo:
            self.redo = False  # the swallowed answer's outcome stands
            return self._retry(key)
        self.outcome = Outcome.RESET
        if self.retry.on_reset and self.idempotent and self.replayable:
            return self._retry(key)
        retriable = b""
        if signal_retriable and self.idempotent and not self.has_body and not self.upgrade:
            retriable = RETRY_IDEMPOTENT
        return Answer(bad_gateway("upstream connection closed", close=True, retriable=retriable))

    def on_idle(self) -> Action:
        """The route's idle timeout passed with nothing moving either way: Envoy's stream
        idle timeout, a 408 before the response head, a reset after it."""
        self.outcome = Outcome.TIMEOUT
        if self.resp_started:
            return CLOSE
        self.redo = False
        return Answer(STREAM_TIMEOUT)

    def on_timeout(self, key: str | None, try_only: bool) -> Action:
        """The exchange's deadline passed: the whole request's (`try_only` False) or this
        try's (upstream endpoint `key`, None while none is attached)."""
        self.outcome = Outcome.TIMEOUT
        if self.resp_started:
            return CLOSE
        self.redo = False  # a swallowed answer that stalled: it is given up with its try
        if try_only and key is not None and self.retry.on_timeout and self.replayable:
            return self._retry(key)
        return Answer(GATEWAY_TIMEOUT)
