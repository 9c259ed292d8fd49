"""The injection webhook's decision, pure: AdmissionReview v1 request bytes in, response out.

Contract (Kubernetes "Dynamic Admission Control", admission.k8s.io/v1): the answer is an
AdmissionReview of the same version whose `response.uid` echoes `request.uid`; a mutation is
`patchType: JSONPatch` with `patch` the base64 of an RFC 6902 patch; a refusal is
`allowed: false` with `status.code` and `status.message` shown to whoever created the pod.

What meshlet answers:
- not JSON, not an AdmissionReview v1, or no `request.uid` to echo: `ReviewError`, which the
  server turns into HTTP 400 (the API server then applies the webhook's failurePolicy);
- anything but a CREATE of a pod (a misconfigured rule, a subresource): allowed, no patch;
- a pod that opted out or is already injected: allowed, no patch;
- a pod that asked for injection but cannot get it (no service name, a bad annotation, a
  container already called meshlet-sidecar): refused, naming the field. Admitting it without
  the sidecar would run a pod that asked for mTLS without it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from agent.inject import InjectError, pod_patch
from agent.inject_template import InjectOptions

API_VERSION = "admission.k8s.io/v1"
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}


class ReviewError(ValueError):
    """The body cannot be answered with an AdmissionReview (HTTP 400)."""


def _load(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # RecursionError: a hostile body nested deeper than the parser's stack.
        raise ReviewError(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ReviewError("expected an AdmissionReview object")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != "AdmissionReview":
        raise ReviewError(
            f"expected apiVersion {API_VERSION} and kind AdmissionReview, got "
            f"{doc.get('apiVersion')!r} and {doc.get('kind')!r}"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        raise ReviewError("request: expected the admission request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("request.uid: expected the request's uid")
    return request


def _answer(uid: str, allowed: bool, **response: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": allowed, **response},
    }


def review(body: bytes, options: InjectOptions) -> dict[str, Any]:
    """The AdmissionReview answering `body`. Raises ReviewError when there is no uid to echo."""
    request = _load(body)
    uid: str = request["uid"]
    if (
        request.get("kind") != POD_KIND
        or request.get("operation") != "CREATE"
        or request.get("subResource")
    ):
        return _answer(uid, True)
    pod = request.get("object")
    if not isinstance(pod, dict):
        return _answer(
            uid,
            False,
            status={"code": 400, "message": "meshlet injection: request.object: expected a Pod"},
        )
    try:
        ops = pod_patch(pod, options)
    except InjectError as exc:
        return _answer(uid, False, status={"code": 400, "message": f"meshlet injection: {exc}"})
    if not ops:
        return _answer(uid, True)
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    return _answer(uid, True, patchType="JSONPatch", patch=patch)
