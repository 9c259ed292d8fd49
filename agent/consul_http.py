"""The Consul client's transport: pooled keep-alive connections (agent/consul_wire.py), a
deadline on every request, the ACL token, TLS, and the mapping of HTTP outcomes onto the
`consul_errors` tree.

Endpoint code above this layer never sees the wire: it gets a `Response` or a `ConsulError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from agent.consul_blocking import blocking_deadline, next_index
from agent.consul_config import ConsulConfig, ConsulTLS
from agent.consul_errors import (
    ConsulACLNotFound,
    ConsulBadRequest,
    ConsulBadResponse,
    ConsulConfigError,
    ConsulNotFound,
    ConsulPermissionDenied,
    ConsulRejected,
    ConsulUnavailable,
)
from agent.consul_wire import CLOSED, NOT_HTTP, TOO_LARGE, TRUNCATED, Connection, Pool, WireError

Params = Sequence[tuple[str, str]]

log = logging.getLogger("meshlet.consul")

# Close idle pooled connections before a server or a load balancer in between is likely to,
# so a reused connection is rarely a dead one (requests are never silently re-sent).
_KEEPALIVE_SECONDS = 10.0
_USER_AGENT = "meshlet-consul-client"
# What may stand in a request line's target or a header value we send: visible ASCII (and
# spaces inside a header value); anything else would let data split the request.
_TARGET = re.compile(r"/[!-~]*")
_FIELD_VALUE = re.compile(r"[!-~]+(?: +[!-~]+)*")


@dataclass(frozen=True, slots=True)
class QueryMeta:
    index: int
    next_index: int
    known_leader: bool
    last_contact: float


@dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP answer from Consul, read within the request's deadline."""

    method: str
    path: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    def bad(self, reason: str) -> ConsulBadResponse:
        return ConsulBadResponse(f"{self.method} {self.path}: {reason}")

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace").strip()

    def json(self) -> Any:
        if not self.body:
            raise self.bad(f"empty body with status {self.status}, expected JSON")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise self.bad(f"response is not JSON: {self.body[:80]!r}") from None
        except RecursionError:  # Python's decoder stops near 1,000 levels
            raise self.bad("response is nested too deeply to decode") from None

    def raise_for_status(self, ok: Collection[int] = (200,)) -> None:
        """Map a non-`ok` status onto the error tree, keeping Consul's plain-text message."""
        if self.status in ok:
            return
        args = (self.method, self.path, self.status, self.text)
        message = self.text
        if self.status == 400:
            raise ConsulBadRequest(*args)
        if self.status == 403:
            if message.startswith("ACL not found"):
                raise ConsulACLNotFound(*args)
            raise ConsulPermissionDenied(*args)
        if self.status == 404:
            raise ConsulNotFound(*args)
        # Rate limiting, a proxy in front of Consul, or a leader election: all pass with time.
        if self.status in (429, 502, 503, 504) or "No cluster leader" in message:
            raise ConsulUnavailable(f"{self.method} {self.path}: {self.status} {message[:2000]}")
        if 300 <= self.status < 400 or self.status < 200:
            raise self.bad(f"unexpected status {self.status} (Consul does not redirect)")
        raise ConsulRejected(*args)

    def query_meta(self, requested_index: int) -> QueryMeta:
        """Blocking-query metadata; the index header is required, since watches depend on it."""
        raw = self.headers.get("X-Consul-Index")
        if raw is None:
            raise self.bad("missing X-Consul-Index header on a blocking endpoint")
        if not raw.isdigit():
            raise self.bad(f"X-Consul-Index {raw!r} is not a non-negative integer")
        index = max(int(raw), 1)
        contact = self.headers.get("X-Consul-LastContact", "0")
        if not contact.isdigit():
            raise self.bad(f"X-Consul-LastContact {contact!r} is not milliseconds")
        return QueryMeta(
            index=index,
            next_index=next_index(requested_index, index),
            known_leader=self.headers.get("X-Consul-KnownLeader") == "true",
            last_contact=int(contact) / 1000,
        )


def _ssl_context(tls: ConsulTLS) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(
            cafile=tls.ca_file and str(tls.ca_file), capath=tls.ca_path and str(tls.ca_path)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConsulConfigError(
            f"cannot load Consul CA (CONSUL_CACERT={tls.ca_file}, CONSUL_CAPATH={tls.ca_path}): "
            f"{exc}"
        ) from None
    if tls.client_cert is not None and tls.client_key is not None:
        try:
            ctx.load_cert_chain(tls.client_cert, tls.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConsulConfigError(
                f"cannot load client certificate {tls.client_cert} with key {tls.client_key} "
                f"(CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY): {exc}"
            ) from None
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_token(config: ConsulConfig) -> str | None:
    if config.token_file is None:
        return config.token
    try:
        from_file = config.token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConsulConfigError(
            f"cannot read Consul token file {config.token_file} (CONSUL_HTTP_TOKEN_FILE): {exc}"
        ) from None
    # Consul's rule: a non-empty token file wins over CONSUL_HTTP_TOKEN.
    return from_file or config.token


class ConsulHTTP:
    """Sends requests to one Consul agent. Reads the token file and TLS files when built."""

    def __init__(self, config: ConsulConfig) -> None:
        self.config = config
        self._ssl = _ssl_context(config.tls) if config.tls is not None else None
        self._server_hostname = config.tls.server_name if config.tls is not None else None
        token = _load_token(config)
        if token and not _FIELD_VALUE.fullmatch(token):
            raise ConsulConfigError(
                "the Consul token has characters a header cannot carry (control characters, "
                "non-ASCII, or spaces around it): check CONSUL_HTTP_TOKEN or the token file"
            )
        self._base = config.base_url
        where = urlsplit(self._base)
        self._host = where.hostname or "localhost"
        self._port = where.port or (443 if self._ssl is not None else 80)
        # Every request's fixed fields, rendered once.
        fields = f"Host: {where.netloc}\r\nUser-Agent: {_USER_AGENT}\r\n"
        if token:
            fields += f"X-Consul-Token: {token}\r\n"
        self._fields = fields.encode("ascii")
        self._pool: Pool | None = None
        self._closed = False
        # Paths whose answer Consul's ACLs have filtered, each warned about once.
        self._filtered: set[str] = set()

    def _open(self) -> Pool:
        if self._closed:
            raise RuntimeError("the Consul client is closed")
        if self._pool is None:
            self._pool = Pool(
                self._dial, limit=self.config.max_connections, keepalive=_KEEPALIVE_SECONDS
            )
        return self._pool

    async def _dial(
        self, factory: Callable[[], Connection]
    ) -> tuple[asyncio.BaseTransport, Connection]:
        loop = asyncio.get_running_loop()
        if self.config.unix_socket is not None:
            return await loop.create_unix_connection(factory, str(self.config.unix_socket))
        if self._ssl is None:
            return await loop.create_connection(factory, self._host, self._port)
        return await loop.create_connection(
            factory,
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._server_hostname or self._host,
        )

    async def open(self) -> None:
        self._open()

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def _request_bytes(
        self,
        method: str,
        path: str,
        params: Params,
        body: bytes | None,
        content_type: str | None,
    ) -> bytes:
        target = f"{path}?{urlencode(list(params), quote_via=quote, safe='')}" if params else path
        if not _TARGET.fullmatch(target):
            raise ValueError(f"{method} {path!r}: not a percent-encoded path")
        head = f"{method} {target} HTTP/1.1\r\n".encode("ascii") + self._fields
        if content_type:
            if not _FIELD_VALUE.fullmatch(content_type):
                raise ValueError(f"content type {content_type!r} is not a header value")
            head += f"Content-Type: {content_type}\r\n".encode("ascii")
        if body is not None or method not in ("GET", "HEAD", "DELETE"):
            head += f"Content-Length: {len(body or b'')}\r\n".encode("ascii")
        return head + b"\r\n" + (body or b"")

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Params = (),
        body: bytes | None = None,
        content_type: str | None = None,
        blocking_wait: float | None = None,
    ) -> Response:
        """Send once and read the whole answer, within the deadline; any status is returned.

        `path` is already percent-encoded. `blocking_wait` is the wait (in seconds) Consul may
        hold this request for; the deadline covers it plus Consul's jitter plus the margin.
        """
        pool = self._open()
        margin = self.config.timeout
        deadline = margin if blocking_wait is None else blocking_deadline(blocking_wait, margin)
        data = self._request_bytes(method, path, params, body, content_type)
        where = f"{method} {path}"
        limit = self.config.max_response_bytes
        try:
            async with asyncio.timeout(deadline):
                answer = await pool.exchange(
                    data, max_body=limit, connect_timeout=min(margin, deadline)
                )
        except TimeoutError as exc:
            raise ConsulUnavailable(
                f"{where}: no complete answer from {self._base} within {deadline:.3g}s"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise ConsulUnavailable(
                f"{where}: TLS certificate of {self._base} not accepted: {exc}"
            ) from exc
        except ssl.SSLError as exc:
            raise ConsulUnavailable(f"{where}: TLS with {self._base} failed: {exc}") from exc
        except WireError as exc:
            raise self._wire_error(where, exc) from exc
        except OSError as exc:
            raise ConsulUnavailable(f"{where}: cannot connect to {self._base}: {exc}") from exc
        if answer.headers.get("X-Consul-Results-Filtered-By-ACLs") == "true":
            self._warn_filtered(method, path)
        return Response(method, path, answer.status, answer.headers, answer.body)

    def _wire_error(self, where: str, exc: WireError) -> ConsulUnavailable | ConsulBadResponse:
        limit = self.config.max_response_bytes
        if exc.kind == CLOSED:
            return ConsulUnavailable(
                f"{where}: {self._base} closed the connection before answering"
            )
        if exc.kind == TRUNCATED:
            return ConsulUnavailable(f"{where}: incomplete body from {self._base}: {exc}")
        if exc.kind == TOO_LARGE:
            return ConsulBadResponse(
                f"{where}: {exc} larger than the {limit}-byte limit (max_response_bytes)"
            )
        assert exc.kind == NOT_HTTP
        return ConsulBadResponse(f"{where}: not an HTTP answer: {exc}")

    def _warn_filtered(self, method: str, path: str) -> None:
        # A filtered read is not an error to Consul (no 403), so without this line a missing
        # service:read or node:read would look like an upstream without instances.
        # A local agent listing hides the other services on the node, which a least-privilege
        # token is meant not to see: nothing to warn about.
        if path in self._filtered or path in ("/v1/agent/services", "/v1/agent/checks"):
            return
        self._filtered.add(path)
        log.warning(
            "Consul's ACLs hid part of the answer to %s %s: the token lacks read permission on "
            "some of it (service:read on the service or its sidecar proxies, node:read on "
            "their nodes, key:read on keys); see docs/acl.md",
            method,
            path,
        )

    async def send_json(
        self, method: str, path: str, payload: Any, *, params: Params = ()
    ) -> Response:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return await self.request(
            method, path, params=params, body=body, content_type="application/json"
        )
