"""devstack's Vault: the slice of Vault's HTTP API that a PKI client needs, on its own listener.

    sys/health, sys/mounts (enable, list, tune, disable), sys/auth (enable approle)
    auth/token/lookup-self, auth/token/renew-self
    auth/approle/role/:name, .../role-id, .../secret-id, auth/approle/login
    <pki mount>/root/generate/internal, roles/:name, issue/:role, sign/:role, ca/pem, ca_chain,
    cert/ca, cert/ca_chain, issuers, issuer/:ref, config/urls

Answers use Vault's envelope (`request_id`, `lease_id`, `renewable`, `lease_duration`, `data`,
`wrap_info`, `warnings`, `auth`) and its error shape (`{"errors": [...]}`, 400 for bad input,
403 `permission denied`, 404 for unknown paths, 405 for unsupported operations).

Tokens: the root token (from the config) and tokens minted by AppRole logins; every valid token
may do everything (devstack has no Vault policies). Tokens expire with their TTL.
"""

from __future__ import annotations

import datetime
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from devstack.config import split_host_port
from devstack.vault_pki import PKIMount, VaultError, mount_ttls, seconds_param, user_error

log = logging.getLogger("devstack.vault")

VAULT_VERSION = "1.17.0"
DEFAULT_TOKEN_TTL = 768 * 3600


@dataclass
class Token:
    id: str
    accessor: str
    policies: list[str]
    ttl: int  # 0: never expires (the root token)
    issued: float
    display_name: str
    meta: dict[str, str] = field(default_factory=dict)

    def expired(self, now: float) -> bool:
        return bool(self.ttl) and now >= self.issued + self.ttl

    def remaining(self, now: float) -> int:
        return max(0, int(self.issued + self.ttl - now)) if self.ttl else 0


@dataclass
class AppRole:
    name: str
    role_id: str
    token_ttl: int
    policies: list[str]
    secret_ids: set[str] = field(default_factory=set)


@dataclass
class Answer:
    data: Any = None
    status: int = 200
    warnings: list[str] | None = None
    auth: dict[str, Any] | None = None
    raw: str | None = None
    content_type: str = "application/json"


Op = Callable[["Request"], Awaitable[Answer]]


@dataclass
class Request:
    op: str  # read | list | create/update | delete
    path: str
    params: dict[str, Any]
    token: Token | None


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class VaultServer:
    def __init__(self, addr: str, root_token: str) -> None:
        self.addr = addr
        self.root_token = root_token
        self.cluster_id = str(uuid.uuid4())
        self.mounts: dict[str, PKIMount] = {}
        self.tokens: dict[str, Token] = {}
        self.auth_mounts: dict[str, str] = {"token": "token"}
        self.approles: dict[str, AppRole] = {}
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._new_token(root_token, ["root"], ttl=0, name="root")

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        host, port = split_host_port(self.addr)
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        self._port = self._runner.addresses[0][1]
        log.info("devstack vault listening on %s", self.url)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host, _ = split_host_port(self.addr)
        return f"http://{'[' + host + ']' if ':' in host else host}:{self._port}"

    def enable_pki(self, path: str) -> PKIMount:
        mount = PKIMount(path)
        self.mounts[path] = mount
        return mount

    # ---- tokens ------------------------------------------------------------------------------

    def _new_token(self, token_id: str, policies: list[str], *, ttl: int, name: str) -> Token:
        token = Token(
            id=token_id,
            accessor=secrets.token_hex(12),
            policies=policies,
            ttl=ttl,
            issued=time.time(),
            display_name=name,
        )
        self.tokens[token_id] = token
        return token

    def _token(self, request: web.Request) -> Token | None:
        raw = request.headers.get("X-Vault-Token", "")
        if not raw:
            scheme, _, rest = request.headers.get("Authorization", "").partition(" ")
            raw = rest.strip() if scheme.lower() == "bearer" else ""
        token = self.tokens.get(raw)
        if token is None or token.expired(time.time()):
            return None
        return token

    def _token_json(self, token: Token) -> dict[str, Any]:
        now = time.time()
        return {
            "accessor": token.accessor,
            "creation_time": int(token.issued),
            "creation_ttl": token.ttl,
            "display_name": token.display_name,
            "entity_id": "",
            "expire_time": None
            if not token.ttl
            else datetime.datetime.fromtimestamp(token.issued + token.ttl, datetime.UTC)
            .isoformat()
            .replace("+00:00", "Z"),
            "explicit_max_ttl": 0,
            "id": token.id,
            "meta": token.meta or None,
            "num_uses": 0,
            "orphan": True,
            "path": "auth/token/root" if not token.ttl else "auth/approle/login",
            "policies": token.policies,
            "renewable": bool(token.ttl),
            "ttl": token.remaining(now),
            "type": "service",
        }

    def _auth_block(self, token: Token) -> dict[str, Any]:
        return {
            "client_token": token.id,
            "accessor": token.accessor,
            "policies": token.policies,
            "token_policies": token.policies,
            "metadata": token.meta or None,
            "lease_duration": token.remaining(time.time()),
            "renewable": bool(token.ttl),
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
        }

    # ---- HTTP -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            answer = await self._dispatch(request)
        except VaultError as err:
            return _errors(err.status, err.messages)
        except Exception as err:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return _errors(500, [f"devstack internal error: {type(err).__name__}: {err}"])
        if answer.raw is not None:
            return web.Response(
                status=answer.status, text=answer.raw, content_type=answer.content_type
            )
        if answer.status == 204:
            return web.Response(status=204)
        body = {
            "request_id": str(uuid.uuid4()),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": answer.data,
            "wrap_info": None,
            "warnings": answer.warnings or None,
            "auth": answer.auth,
        }
        return _json(body, answer.status)

    async def _dispatch(self, request: web.Request) -> Answer:
        if not request.path.startswith("/v1/"):
            raise VaultError(404)
        path = request.path[len("/v1/") :].strip("/")
        method = request.method.upper()
        if method == "LIST" or (method == "GET" and request.query.get("list") == "true"):
            op = "list"
        elif method in ("GET", "HEAD"):
            op = "read"
        elif method in ("POST", "PUT", "PATCH"):
            op = "update"
        elif method == "DELETE":
            op = "delete"
        else:
            raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")
        params: dict[str, Any] = {}
        if op == "update":
            raw = await request.read()
            if raw.strip():
                try:
                    decoded = json.loads(raw)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    raise user_error("failed to parse JSON input: invalid character") from None
                if not isinstance(decoded, dict):
                    raise user_error("failed to parse JSON input: not an object")
                params = decoded
        else:
            params = dict(request.query)
        if path == "sys/health":
            return self._health(request)
        unauthenticated = (
            path.endswith(("/ca/pem", "/ca_chain", "/cert/ca", "/cert/ca_chain", "/ca"))
            or path.startswith("auth/approle/login")
            or path == "sys/seal-status"
        )
        token = self._token(request)
        if token is None and not unauthenticated:
            raise VaultError(403, "permission denied")
        req = Request(op=op, path=path, params=params, token=token)
        if path == "sys/seal-status":
            return Answer(raw=json.dumps(self._seal_status()), content_type="application/json")
        if path.startswith("sys/mounts"):
            return self._sys_mounts(req)
        if path.startswith("sys/auth"):
            return self._sys_auth(req)
        if path.startswith("auth/token/"):
            return self._auth_token(req)
        if path.startswith("auth/approle/"):
            return self._approle(req)
        mount_path, _, rest = path.partition("/")
        mount = self.mounts.get(mount_path)
        if mount is None:
            raise VaultError(404, f'no handler for route "{path}". route entry not found.')
        return self._pki(mount, rest, req)

    # ---- sys -------------------------------------------------------------------------------

    def _health(self, request: web.Request) -> Answer:
        body = {
            "initialized": True,
            "sealed": False,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VAULT_VERSION,
            "enterprise": False,
            "cluster_name": "devstack-vault",
            "cluster_id": self.cluster_id,
        }
        # sys/health carries its verdict in the status code and is never wrapped.
        return Answer(raw=json.dumps(body), content_type="application/json")

    def _seal_status(self) -> dict[str, Any]:
        return {
            "type": "shamir",
            "initialized": True,
            "sealed": False,
            "t": 1,
            "n": 1,
            "progress": 0,
            "version": VAULT_VERSION,
            "cluster_id": self.cluster_id,
        }

    def _sys_mounts(self, req: Request) -> Answer:
        rest = req.path[len("sys/mounts") :].strip("/")
        if not rest:
            if req.op != "read":
                raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")
            listing = {
                f"{p}/": {
                    "type": "pki",
                    "description": "",
                    "config": {
                        "default_lease_ttl": int(m.default_lease_ttl),
                        "max_lease_ttl": int(m.max_lease_ttl),
                    },
                }
                for p, m in self.mounts.items()
            }
            return Answer(data=listing)
        if rest.endswith("/tune"):
            mount = self.mounts.get(rest.removesuffix("/tune"))
            if mount is None:
                raise user_error(f"cannot fetch sysview for path {rest.removesuffix('/tune')!r}")
            if req.op == "read":
                return Answer(
                    data={
                        "default_lease_ttl": int(mount.default_lease_ttl),
                        "max_lease_ttl": int(mount.max_lease_ttl),
                    }
                )
            mount.default_lease_ttl, mount.max_lease_ttl = mount_ttls(
                {
                    "default_lease_ttl": req.params.get("default_lease_ttl")
                    or mount.default_lease_ttl,
                    "max_lease_ttl": req.params.get("max_lease_ttl") or mount.max_lease_ttl,
                }
            )
            return Answer(status=204)
        if req.op == "delete":
            self.mounts.pop(rest, None)
            return Answer(status=204)
        if req.op != "update":
            raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")
        kind = req.params.get("type", "")
        if kind != "pki":
            raise user_error(f"plugin not found in the catalog: {kind}")
        if rest in self.mounts:
            raise user_error(f"path is already in use at {rest}/")
        mount = self.enable_pki(rest)
        mount.default_lease_ttl, mount.max_lease_ttl = mount_ttls(req.params.get("config") or {})
        return Answer(status=204)

    def _sys_auth(self, req: Request) -> Answer:
        rest = req.path[len("sys/auth") :].strip("/")
        if not rest and req.op == "read":
            return Answer(data={f"{p}/": {"type": t} for p, t in self.auth_mounts.items()})
        if req.op == "update":
            kind = req.params.get("type", "")
            if kind != "approle":
                raise user_error(f"plugin not found in the catalog: {kind}")
            self.auth_mounts[rest] = kind
            return Answer(status=204)
        raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")

    # ---- auth --------------------------------------------------------------------------------

    def _auth_token(self, req: Request) -> Answer:
        assert req.token is not None
        what = req.path.removeprefix("auth/token/")
        if what == "lookup-self":
            return Answer(data=self._token_json(req.token))
        if what == "renew-self":
            if req.token.ttl:
                req.token.issued = time.time()
            return Answer(auth=self._auth_block(req.token))
        raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")

    def _approle(self, req: Request) -> Answer:
        if "approle" not in self.auth_mounts:
            raise VaultError(404, f'no handler for route "{req.path}". route entry not found.')
        parts = req.path.split("/")[2:]
        if parts == ["login"]:
            return self._approle_login(req)
        if req.token is None:
            raise VaultError(403, "permission denied")
        if len(parts) >= 2 and parts[0] == "role":
            name = parts[1]
            if len(parts) == 2 and req.op == "update":
                existing = self.approles.get(name)
                ttl = req.params.get("token_ttl", existing.token_ttl if existing else 0)
                self.approles[name] = AppRole(
                    name=name,
                    role_id=existing.role_id if existing else str(uuid.uuid4()),
                    token_ttl=int(seconds_param(ttl, "token_ttl")) or DEFAULT_TOKEN_TTL,
                    policies=list(req.params.get("token_policies") or ["default"]),
                    secret_ids=existing.secret_ids if existing else set(),
                )
                return Answer(status=204)
            role = self.approles.get(name)
            if role is None:
                raise user_error(f'role "{name}" does not exist')
            if parts[2:] == ["role-id"]:
                return Answer(data={"role_id": role.role_id})
            if parts[2:] == ["secret-id"] and req.op == "update":
                secret = str(uuid.uuid4())
                role.secret_ids.add(secret)
                return Answer(
                    data={
                        "secret_id": secret,
                        "secret_id_accessor": str(uuid.uuid4()),
                        "secret_id_ttl": 0,
                        "secret_id_num_uses": 0,
                    }
                )
        raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")

    def _approle_login(self, req: Request) -> Answer:
        role_id = str(req.params.get("role_id", ""))
        secret_id = str(req.params.get("secret_id", ""))
        role = next((r for r in self.approles.values() if r.role_id == role_id), None)
        if role is None:
            raise user_error("invalid role or secret ID")
        if secret_id not in role.secret_ids:
            raise user_error("invalid role or secret ID")
        token = self._new_token(
            "hvs." + secrets.token_urlsafe(24),
            role.policies,
            ttl=role.token_ttl,
            name=f"approle-{role.name}",
        )
        token.meta = {"role_name": role.name}
        return Answer(auth=self._auth_block(token))

    # ---- PKI -------------------------------------------------------------------------------

    def _pki(self, mount: PKIMount, rest: str, req: Request) -> Answer:
        now = utcnow()
        parts = rest.split("/")
        head = parts[0]
        if rest in ("ca/pem", "ca_chain") and req.op == "read":
            pem = mount.issuer().pem if rest == "ca/pem" else mount.ca_chain_pem()
            return Answer(raw=pem, content_type="application/pem-certificate-chain")
        if rest in ("cert/ca", "cert/ca_chain") and req.op == "read":
            issuer = mount.issuer()
            chain = mount.chain_of(issuer)
            cert = issuer.pem if rest == "cert/ca" else "".join(chain)
            return Answer(data={"certificate": cert, "ca_chain": chain, "revocation_time": 0})
        if req.token is None:
            raise VaultError(403, "permission denied")
        if rest == "root/generate/internal" and req.op == "update":
            return Answer(data=mount.generate_root(req.params, now))
        if head == "roles":
            return self._roles(mount, parts[1:], req)
        if head in ("issue", "sign") and len(parts) == 2 and req.op == "update":
            if head == "issue":
                data, warnings = mount.issue(parts[1], req.params, now)
            else:
                data, warnings = mount.sign(parts[1], req.params, now)
            return Answer(data=data, warnings=warnings)
        if rest == "issuers" and req.op == "list":
            return Answer(data=mount.issuers_list())
        if head == "issuer" and len(parts) == 2 and req.op == "read":
            return Answer(data=mount.issuer_json(parts[1]))
        if rest == "config/urls":
            if req.op == "update":
                mount.urls.update(req.params)
                return Answer(status=204)
            return Answer(data=mount.urls)
        raise VaultError(404, f'no handler for route "{mount.path}/{rest}". route entry not found.')

    def _roles(self, mount: PKIMount, parts: list[str], req: Request) -> Answer:
        if not parts or not parts[0]:
            if req.op != "list":
                raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")
            if not mount.roles:
                raise VaultError(404)
            return Answer(data={"keys": sorted(mount.roles)})
        name = parts[0]
        if req.op == "update":
            return Answer(data=mount.write_role(name, req.params))
        if req.op == "read":
            role = mount.roles.get(name)
            if role is None:
                raise VaultError(404)
            return Answer(data=role)
        if req.op == "delete":
            mount.roles.pop(name, None)
            return Answer(status=204)
        raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")


def _json(body: Any, status: int) -> web.Response:
    # Exactly "application/json", no charset: hvac only reads Vault's error list then.
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def _errors(status: int, messages: list[str]) -> web.Response:
    return _json({"errors": messages}, status)
