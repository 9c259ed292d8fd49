"""`meshlet inject --webhook`: real AdmissionReview v1 documents POSTed over HTTPS (a CA and
a certificate for the webhook's Service name made with devstack's issuer, verified as the API
server verifies), the returned JSONPatch applied with an independent RFC 6902 implementation
(jsonpatch), and the result compared with what `meshlet inject` writes for the same pod.
Hostile bodies go over a raw TLS socket."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import io
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml

from agent.inject import INJECTED, inject_stream
from agent.inject_template import SIDECAR, InjectOptions
from agent.inject_webhook import MAX_BODY, InjectWebhook
from devstack.issuer import cert_pem, generate_key, key_pem, new_root
from tests.deploy.kube import validate
from tests.integration.test_agent_process import ENV

SERVICE_DNS = "meshlet-injector.meshlet-system.svc"
OPTS = InjectOptions(image="registry.example/meshlet:0.1.0")
MESHLET = str(Path(sys.executable).with_name("meshlet"))


# ---- certificates and the server ---------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


def make_pki(directory: Path, name: str = "ca") -> Pki:
    """A CA and a serving certificate for the webhook Service's DNS name, as an operator (or
    cert-manager) makes them; caBundle would hold the CA."""
    now = datetime.datetime.now(datetime.UTC)
    issuer = new_root(f"meshlet injector test {name}", ttl=datetime.timedelta(days=1), now=now)
    key = generate_key("ec", 256)
    cert = issuer.sign_leaf(
        key.public_key(),
        uri_sans=[],
        dns_sans=[SERVICE_DNS],
        common_name=SERVICE_DNS,
        ttl=datetime.timedelta(hours=1),
        now=now,
    )
    pki = Pki(directory / f"{name}.crt", directory / "tls.crt", directory / "tls.key")
    pki.ca.write_text(issuer.pem)
    pki.cert.write_text(cert_pem(cert))
    pki.key.write_text(key_pem(key))
    return pki


def api_server_context(ca: Path) -> ssl.SSLContext:
    """What the API server does with caBundle: trust only it, check the Service's DNS name."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass
class Hook:
    server: InjectWebhook
    pki: Pki
    host: str
    port: int

    async def post(self, body: bytes) -> tuple[int, Any]:
        ctx = api_server_context(self.pki.ca)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"https://{self.host}:{self.port}/mutate",
                data=io.BytesIO(body),
                headers={"Content-Type": "application/json"},
                ssl=ctx,
                server_hostname=SERVICE_DNS,
            ) as resp,
        ):
            raw = await resp.read()
            if resp.content_type == "application/json":
                return resp.status, json.loads(raw)
            return resp.status, raw.decode()

    async def raw(self, request: bytes) -> bytes:
        """Bytes on a TLS socket, the whole answer back (the server closes or answers)."""
        reader, writer = await asyncio.open_connection(
            self.host,
            self.port,
            ssl=api_server_context(self.pki.ca),
            server_hostname=SERVICE_DNS,
        )
        try:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            return head
        finally:
            writer.close()


@pytest.fixture
async def hook(tmp_path: Path) -> AsyncIterator[Hook]:
    pki = make_pki(tmp_path)
    server = InjectWebhook(OPTS, pki.cert, pki.key, "127.0.0.1", 0)
    await server.start()
    host, _, port = server.address.rpartition(":")
    try:
        yield Hook(server, pki, host, int(port))
    finally:
        await server.close()


# ---- admission reviews as the API server sends them --------------------------------------------


def replicaset_pod(annotations: dict[str, str] | None) -> dict[str, Any]:
    """A pod as the ReplicaSet controller creates it, after the API server's defaulting."""
    meta: dict[str, Any] = {
        "generateName": "web-7d4b9c-",
        "namespace": "shop",
        "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7d4b9c",
                "uid": "6c1b4a4e-6d0b-4bd8-a3bb-3cf1f1a3f0c1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "registry.example/web:1.0",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": True,
        },
        "status": {},
    }


def review(
    pod: Any,
    *,
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
    operation: str = "CREATE",
    kind: dict[str, str] | None = None,
    sub_resource: str | None = None,
) -> dict[str, Any]:
    kind = kind or {"group": "", "version": "v1", "kind": "Pod"}
    request: dict[str, Any] = {
        "uid": uid,
        "kind": kind,
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": kind,
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop",
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "groups": ["system:serviceaccounts", "system:authenticated"],
        },
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if sub_resource:
        request["subResource"] = sub_resource
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def _body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _manual(pod: dict[str, Any]) -> dict[str, Any]:
    """What `meshlet inject` writes for the same pod."""
    (out,) = yaml.safe_load_all(inject_stream(yaml.safe_dump(pod), OPTS))
    assert isinstance(out, dict)
    return out


UPSTREAMS = {"meshlet.io/upstreams": "api:9191", "meshlet.io/protocol": "http"}


@pytest.mark.parametrize(
    "annotations",
    [
        {"meshlet.io/inject": "true", **UPSTREAMS},
        None,  # a namespace labelled for injection: the pod has no annotations at all
        {},
    ],
    ids=["annotated", "no-annotations-key", "empty-annotations"],
)
async def test_patch_applied_gives_what_meshlet_inject_writes(
    hook: Hook, annotations: dict[str, str] | None
) -> None:
    pod = replicaset_pod(annotations)
    pod["spec"]["initContainers"] = [{"name": "migrate", "image": "registry.example/m:1"}]
    pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    status, answer = await hook.post(_body(review(pod)))
    assert status == 200
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    patched = jsonpatch.apply_patch(pod, ops)
    assert patched == _manual(pod)
    assert patched["metadata"]["annotations"][INJECTED] == "true"
    names = [c["name"] for c in patched["spec"]["initContainers"]]
    assert names == ["meshlet-init", SIDECAR, "migrate"]
    validate({**patched, "metadata": {**patched["metadata"], "name": "web-7d4b9c-x2x9q"}})


async def test_opted_out_and_already_injected_pods_are_allowed_without_a_patch(
    hook: Hook,
) -> None:
    opted_out = replicaset_pod({"meshlet.io/inject": "false"})
    injected = _manual(replicaset_pod({"meshlet.io/inject": "true"}))
    for pod in (opted_out, injected):
        status, answer = await hook.post(_body(review(pod, uid="u-1")))
        assert status == 200
        assert answer["response"] == {"uid": "u-1", "allowed": True}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"operation": "UPDATE"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"sub_resource": "ephemeralcontainers"},
    ],
    ids=["update", "not-a-pod", "subresource"],
)
async def test_requests_the_webhook_is_not_for_are_allowed_unchanged(
    hook: Hook, kwargs: dict[str, Any]
) -> None:
    """A rule set wider than the manifest's (CREATE pods) must not block anything."""
    status, answer = await hook.post(_body(review(replicaset_pod(None), uid="u-2", **kwargs)))
    assert status == 200
    assert answer["response"] == {"uid": "u-2", "allowed": True}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda p: p["spec"]["containers"][0].update(name=SIDECAR),
            "spec.containers[0].name: 'meshlet-sidecar' is the name of meshlet's injected",
        ),
        (
            lambda p: p["metadata"].update(labels={}),
            "metadata.annotations.meshlet.io/service: no service name",
        ),
        (
            # The kubelet would expand this in the init container's args.
            lambda p: p["metadata"]["annotations"].update({"meshlet.io/service": "$(POD_IP)"}),
            "metadata.annotations.meshlet.io/service: expected a service name",
        ),
        (
            lambda p: p["spec"].update(containers="web"),
            "spec.containers: expected a list, got a string",
        ),
        (lambda p: p.pop("spec"), "spec: expected a pod spec mapping, got null"),
    ],
    ids=["our-container-name", "no-service", "kubelet-variable", "containers-not-list", "no-spec"],
)
async def test_a_pod_that_asked_for_injection_but_cannot_get_it_is_refused(
    hook: Hook, mutate: Any, message: str
) -> None:
    pod = replicaset_pod({"meshlet.io/inject": "true"})
    mutate(pod)
    status, answer = await hook.post(_body(review(pod, uid="u-3")))
    assert status == 200
    response = answer["response"]
    assert response["uid"] == "u-3"
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == 400
    assert response["status"]["message"].startswith("meshlet injection: ")
    assert message in response["status"]["message"]


async def test_a_review_without_an_object_is_refused_not_admitted(hook: Hook) -> None:
    status, answer = await hook.post(_body(review(None, uid="u-4")))
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert "request.object: expected a Pod" in answer["response"]["status"]["message"]


# ---- hostile bodies ----------------------------------------------------------------------------


def _post(body: bytes) -> bytes:
    return (
        b"POST /mutate HTTP/1.1\r\nHost: " + SERVICE_DNS.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )


async def _still_serves(hook: Hook) -> None:
    status, answer = await hook.post(_body(review(replicaset_pod({}), uid="after")))
    assert status == 200 and answer["response"]["uid"] == "after"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not JSON"),
        (b"[]", "expected an AdmissionReview object"),
        (
            _body({**review(replicaset_pod({})), "apiVersion": "admission.k8s.io/v1beta1"}),
            "expected apiVersion admission.k8s.io/v1 and kind AdmissionReview",
        ),
        (_body({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}), "request:"),
        (
            _body(
                {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {"uid": 7},
                }
            ),
            "request.uid: expected the request's uid",
        ),
        # Nested past the JSON parser's recursion limit: must be a 400, not a crash.
        (b"[" * 200_000 + b"]" * 200_000, "the body is not JSON"),
        (b'{"request": ' * 50_000 + b"1" + b"}" * 50_000, "the body is not JSON"),
    ],
    ids=["not-json", "not-object", "v1beta1", "no-request", "bad-uid", "deep-list", "deep-map"],
)
async def test_unanswerable_bodies_get_400_with_the_reason(
    hook: Hook, body: bytes, message: str
) -> None:
    """No uid to echo, so no AdmissionReview can answer: HTTP 400, and the API server applies
    failurePolicy (Fail: the pod is not created without its sidecar)."""
    status, text = await hook.post(body)
    assert status == 400
    assert isinstance(text, str) and text.startswith("meshlet injection: ")
    assert message in text
    await _still_serves(hook)


async def test_an_oversized_body_is_refused_before_it_is_parsed(hook: Hook) -> None:
    head = await hook.raw(_post(b" " * (MAX_BODY + 1)))
    assert head.startswith(b"HTTP/1.1 413 ")
    await _still_serves(hook)


async def test_a_pod_as_large_as_the_api_server_allows_is_answered(hook: Hook) -> None:
    """etcd's and the API server's 3 MiB request limit bounds a real pod; aiohttp's default
    body limit (1 MiB) would refuse such a pod with 413 and, failurePolicy Fail, block it."""
    pod = replicaset_pod({"meshlet.io/inject": "true", "example.com/blob": "x" * 3_000_000})
    status, answer = await hook.post(_body(review(pod, uid="big")))
    assert status == 200
    assert answer["response"]["uid"] == "big" and answer["response"]["allowed"] is True


async def test_plain_http_gets_no_answer(hook: Hook) -> None:
    reader, writer = await asyncio.open_connection(hook.host, hook.port)
    writer.write(_post(_body(review(replicaset_pod({})))))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert b"AdmissionReview" not in data
    await _still_serves(hook)


async def test_a_client_verifying_another_name_is_refused_by_its_own_check(hook: Hook) -> None:
    """The certificate names only the Service: the API server's hostname check is real."""
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            hook.host,
            hook.port,
            ssl=api_server_context(hook.pki.ca),
            server_hostname="other.meshlet-system.svc",
        )


# ---- certificate rotation ----------------------------------------------------------------------


async def _peer_ca_accepts(hook: Hook, ca: Path) -> bool:
    try:
        _, writer = await asyncio.open_connection(
            hook.host, hook.port, ssl=api_server_context(ca), server_hostname=SERVICE_DNS
        )
    except ssl.SSLCertVerificationError:
        return False
    writer.close()
    return True


async def test_rotated_certificate_files_are_served_to_new_connections(
    hook: Hook, tmp_path: Path
) -> None:
    old_ca = hook.pki.ca
    (tmp_path / "new").mkdir()
    fresh = make_pki(tmp_path / "new", "new")
    # A half-written rotation (new cert, old key) is not taken up.
    hook.pki.cert.write_text(fresh.cert.read_text())
    assert hook.server.reload_tls() is False
    assert await _peer_ca_accepts(hook, old_ca)
    hook.pki.key.write_text(fresh.key.read_text())
    assert hook.server.reload_tls() is True
    assert await _peer_ca_accepts(hook, fresh.ca)
    assert not await _peer_ca_accepts(hook, old_ca)
    assert hook.server.reload_tls() is False  # unchanged files: nothing to do


# ---- the process -------------------------------------------------------------------------------


def test_webhook_process_answers_over_https_and_stops_on_sigterm(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    proc = subprocess.Popen(
        [
            MESHLET,
            "inject",
            "--webhook",
            "--tls-cert",
            str(pki.cert),
            "--tls-key",
            str(pki.key),
            "--listen",
            "127.0.0.1:0",
            "--image",
            "registry.example/m:2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "webhook at https://127.0.0.1:" in line, line
        address = line.split("https://")[1].split("/")[0]
        host, _, port = address.rpartition(":")

        async def call() -> tuple[int, Any]:
            return await Hook(None, pki, host, int(port)).post(  # type: ignore[arg-type]
                _body(review(replicaset_pod({"meshlet.io/inject": "true"})))
            )

        status, answer = asyncio.run(call())
        assert status == 200 and answer["response"]["allowed"] is True
        ops = json.loads(base64.b64decode(answer["response"]["patch"]))
        images = {
            c["image"] for op in ops if op["path"] == "/spec/initContainers" for c in op["value"]
        }
        assert images == {"registry.example/m:2"}
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_webhook_without_tls_files_refuses_to_start() -> None:
    done = subprocess.run(
        [MESHLET, "inject", "--webhook"],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert done.returncode == 2
    assert "--tls-cert and --tls-key are required" in done.stderr


def test_answers_never_share_state_between_reviews() -> None:
    """The decision is pure: the same body gives the same answer, whatever came before."""
    from agent.inject_admission import review as decide

    body = _body(review(replicaset_pod({"meshlet.io/inject": "true", **UPSTREAMS})))
    first = decide(body, OPTS)
    decide(_body(review(replicaset_pod({"meshlet.io/inject": "false"}))), OPTS)
    assert decide(body, OPTS) == first == copy.deepcopy(first)
