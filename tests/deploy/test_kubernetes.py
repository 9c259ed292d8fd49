"""`meshlet inject` and the kubernetes/ artefacts, checked against the Kubernetes API's own
schemas (kubernetes-validate, strict) and against meshlet itself: the injected command lines
parse with meshlet's parsers, the probes hit the admin server's real routes, and an injected
pod's containers, run as the kubelet would run them, register the service and get ready."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import probe
from agent.admin import AdminServer
from agent.cli import build_parser
from agent.inject import InjectError, inject_stream
from agent.inject_template import ADMIN_ADDRESS, INIT, SIDECAR, SIDECAR_PORT, InjectOptions
from tests.deploy.kube import command_line, container_env, expand, pod_template, validate
from tests.integration.test_agent_process import ENV, Proc, _free_port, start_dev

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "kubernetes"
MESHLET = str(Path(sys.executable).with_name("meshlet"))
MESHLET_PROBE = str(Path(sys.executable).with_name("meshlet-probe"))
OPTS = InjectOptions(image="registry.example/meshlet:0.1.0")

POD_SPEC: dict[str, Any] = {
    "containers": [
        {
            "name": "web",
            "image": "registry.example/web:1.0",
            "ports": [{"name": "http", "containerPort": 8080}],
        }
    ]
}
TEMPLATE: dict[str, Any] = {
    "metadata": {
        "labels": {"app": "web"},
        "annotations": {"meshlet.io/upstreams": "api:9191,db:9192"},
    },
    "spec": POD_SPEC,
}
SELECTOR = {"matchLabels": {"app": "web"}}


def _workload(kind: str) -> dict[str, Any]:
    meta = {"name": "web", "namespace": "shop"}
    tpl = copy.deepcopy(TEMPLATE)
    if kind == "Pod":
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**meta, **tpl["metadata"]},
            "spec": tpl["spec"],
        }
    if kind in ("Job", "CronJob"):
        tpl["spec"] = {**tpl["spec"], "restartPolicy": "Never"}
        job = {"template": tpl}
        if kind == "Job":
            return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job}
        return {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": meta,
            "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": job}},
        }
    spec: dict[str, Any] = {"selector": SELECTOR, "template": tpl}
    if kind == "StatefulSet":
        spec["serviceName"] = "web"
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec}


KINDS = ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"]


def _inject(doc: Mapping[str, Any] | str, options: InjectOptions = OPTS) -> list[Any]:
    text = doc if isinstance(doc, str) else yaml.safe_dump(dict(doc), sort_keys=False)
    return list(yaml.safe_load_all(inject_stream(text, options)))


def _by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in items}


# ---- every workload kind -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_workload_kind_gets_init_and_native_sidecar_and_validates(kind: str) -> None:
    before = _workload(kind)
    validate(before)
    (after,) = _inject(before)
    validate(after)
    pod = pod_template(after)
    spec = pod["spec"]
    init, side = spec["initContainers"][:2]
    assert (init["name"], side["name"]) == (INIT, SIDECAR)
    assert "restartPolicy" not in init  # runs once, before the sidecar starts
    assert side["restartPolicy"] == "Always"  # native sidecar: up before the app, down after
    assert spec["containers"] == POD_SPEC["containers"]  # the app is left as it was
    assert pod["metadata"]["annotations"]["meshlet.io/injected"] == "true"
    assert {v["name"] for v in spec["volumes"]} == {
        "meshlet-config",
        "meshlet-tmp",
        "meshlet-consul-token",
    }
    for c in (init, side):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["image"] == OPTS.image
    env = {e["name"]: e for e in side["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["CONSUL_HTTP_ADDR"]["value"] == "$(HOST_IP):8500"
    token = _by_name(spec["volumes"])["meshlet-consul-token"]["secret"]
    assert token["secretName"] == "meshlet-consul-token"
    mounts = {m["name"]: m["mountPath"] for m in side["volumeMounts"]}
    assert env["CONSUL_HTTP_TOKEN_FILE"]["value"] == (
        f"{mounts['meshlet-consul-token']}/{token['items'][0]['path']}"
    )
    assert side["ports"] == [
        {"name": "meshlet-mtls", "containerPort": SIDECAR_PORT, "protocol": "TCP"}
    ]


def test_the_users_own_init_containers_run_after_the_sidecar_is_up() -> None:
    doc = _workload("Deployment")
    doc["spec"]["template"]["spec"]["initContainers"] = [
        {"name": "migrate", "image": "registry.example/migrate:1"}
    ]
    (after,) = _inject(doc)
    validate(after)
    names = [c["name"] for c in after["spec"]["template"]["spec"]["initContainers"]]
    assert names == [INIT, SIDECAR, "migrate"]


def test_injecting_twice_changes_nothing() -> None:
    text = yaml.safe_dump_all([_workload(k) for k in KINDS], sort_keys=False)
    once = inject_stream(text, OPTS)
    assert once != text
    assert inject_stream(once, OPTS) == once


def test_other_documents_and_opted_out_workloads_are_copied_byte_for_byte() -> None:
    opted_out = _workload("Deployment")
    opted_out["metadata"]["name"] = "batch"
    opted_out["spec"]["template"]["metadata"]["annotations"]["meshlet.io/inject"] = "false"
    service = "# the web Service\napiVersion: v1\nkind: Service\nmetadata: {name: web}  # keep\n"
    crd = "apiVersion: example.com/v1\nkind: Deployment   # not apps/v1: not ours\nspec: {x: 1}\n"
    text = (
        service
        + "---\n"
        + yaml.safe_dump(opted_out, sort_keys=False)
        + "---\n"
        + yaml.safe_dump(_workload("Deployment"), sort_keys=False)
        + "--- # a ConfigMap with a comment\n"
        + "apiVersion: v1\nkind: ConfigMap\ndata: {k: v}\n"
        + "---\n"
        + crd
    )
    out = inject_stream(text, OPTS)
    assert out.startswith(service + "---\n" + yaml.safe_dump(opted_out, sort_keys=False) + "---\n")
    assert out.endswith(
        "--- # a ConfigMap with a comment\napiVersion: v1\nkind: ConfigMap\ndata: {k: v}\n"
        "---\n" + crd
    )
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == [
        "Service",
        "Deployment",
        "Deployment",
        "ConfigMap",
        "Deployment",
    ]
    assert "initContainers" not in docs[1]["spec"]["template"]["spec"]
    assert docs[2]["spec"]["template"]["spec"]["initContainers"][1]["name"] == SIDECAR


def test_a_bad_item_of_a_list_is_named_with_its_kind() -> None:
    bad = _workload("Job")
    bad["spec"]["template"]["spec"]["containers"][0]["name"] = SIDECAR
    doc = {"apiVersion": "v1", "kind": "List", "items": [_workload("Pod"), bad]}
    with pytest.raises(InjectError) as err:
        inject_stream(yaml.safe_dump(doc), OPTS)
    assert str(err.value).startswith(
        "document 1 (List): items[1] (Job web): spec.template.spec.containers[0].name:"
    )


def test_a_list_document_has_its_items_injected() -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": [_workload("Pod"), _workload("Job")]}
    (after,) = _inject(doc)
    for item in after["items"]:
        validate(item)
        assert pod_template(item)["spec"]["initContainers"][1]["name"] == SIDECAR


# ---- annotations -------------------------------------------------------------------------------


def _init_args(doc: Mapping[str, Any]) -> Any:
    init = pod_template(doc)["spec"]["initContainers"][0]
    return build_parser().parse_args(init["args"])


def test_annotations_set_service_port_protocol_and_upstreams() -> None:
    doc = _workload("Deployment")
    tpl = doc["spec"]["template"]
    tpl["metadata"]["annotations"].update(
        {
            "meshlet.io/service": "storefront",
            "meshlet.io/service-port": "metrics",
            "meshlet.io/protocol": "grpc",
        }
    )
    tpl["spec"]["containers"][0]["ports"].append({"name": "metrics", "containerPort": 9102})
    (after,) = _inject(doc)
    args = _init_args(after)
    assert (args.service, args.service_port, args.protocol, args.upstreams) == (
        "storefront",
        "9102",
        "grpc",
        "api:9191,db:9192",
    )


def test_defaults_are_the_app_label_and_the_first_container_port() -> None:
    doc = _workload("Deployment")
    del doc["spec"]["template"]["metadata"]["annotations"]
    (after,) = _inject(doc)
    args = _init_args(after)
    assert (args.service, args.service_port, args.protocol, args.upstreams) == (
        "web",
        "8080",
        "tcp",
        None,
    )


# ---- refusals ----------------------------------------------------------------------------------


_DELETE = object()
T = "spec/template"
A = f"{T}/metadata/annotations"
PREFIX = "document 1 (Deployment web): spec.template."


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            f"{T}/spec/containers/0/name",
            SIDECAR,
            "spec.containers[0].name: 'meshlet-sidecar' is the name of meshlet's injected",
        ),
        (
            f"{T}/spec/initContainers",
            [{"name": INIT, "image": "x"}],
            "spec.initContainers[0].name: 'meshlet-init' is the name of meshlet's injected",
        ),
        (
            f"{T}/spec/volumes",
            [{"name": "meshlet-config", "emptyDir": {}}],
            "spec.volumes[0].name: 'meshlet-config' is the name of a volume meshlet injects",
        ),
        (
            f"{A}/meshlet.io~1inject",
            "yes",
            'metadata.annotations.meshlet.io/inject: expected "true" or "false", got \'yes\'',
        ),
        (
            f"{A}/meshlet.io~1inject",
            False,
            "metadata.annotations.meshlet.io/inject: expected a string (quote it), got a boolean",
        ),
        (
            f"{T}/metadata/labels",
            _DELETE,
            "metadata.annotations.meshlet.io/service: no service name",
        ),
        (
            f"{T}/spec/containers/0/ports",
            _DELETE,
            "metadata.annotations.meshlet.io/service-port: no application port",
        ),
        (
            f"{A}/meshlet.io~1upstreams",
            "api",
            "metadata.annotations.meshlet.io/upstreams: expected NAME:LOCAL_PORT, got 'api'",
        ),
        (
            f"{A}/meshlet.io~1upstreams",
            "api:8080",
            "meshlet.io/upstreams: local port 8080 of api is the application port",
        ),
        (
            f"{A}/meshlet.io~1upstreams",
            "api:19000",
            "meshlet.io/upstreams: local port 19000 of api is the sidecar's admin port",
        ),
        (f"{A}/meshlet.io~1upstreams", "api:9191,api:9192", "upstream 'api' is listed twice"),
        (
            f"{A}/meshlet.io~1service-port",
            "70000",
            "meshlet.io/service-port: expected a port number from 1 to 65535, got '70000'",
        ),
        (f"{A}/meshlet.io~1protocol", "udp", "meshlet.io/protocol: expected one of tcp, http"),
        (
            f"{T}/spec/containers",
            {"name": "web"},
            "spec.containers: expected a list, got a mapping",
        ),
        (f"{T}/spec/containers", [], "spec.containers: expected at least one container"),
        (f"{T}/spec", _DELETE, "spec: expected a pod spec mapping, got null"),
        (
            f"{T}/spec/containers/0/ports",
            [{"containerPort": 8080}, {"name": "debug", "containerPort": 19000}],
            "spec.containers[0].ports[1].containerPort: 19000 is the sidecar's admin port",
        ),
        (
            f"{T}/spec/hostNetwork",
            True,
            "spec.hostNetwork: meshlet does not inject pods on the node's network",
        ),
    ],
)
def test_malformed_input_is_refused_naming_the_document_and_field(
    path: str, value: Any, message: str
) -> None:
    doc = _workload("Deployment")
    path = path.replace("~1", "\x00")
    parts = [p.replace("\x00", "/") for p in path.split("/")]
    node: Any = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    with pytest.raises(InjectError) as err:
        inject_stream(yaml.safe_dump(doc), OPTS)
    text = str(err.value)
    assert text.startswith(PREFIX) or text.startswith("document 1 (Deployment web): spec.template:")
    assert message in text


def test_a_missing_pod_template_is_named() -> None:
    doc = _workload("Deployment")
    del doc["spec"]["template"]
    with pytest.raises(
        InjectError,
        match=r"document 1 \(Deployment web\): spec.template: "
        "expected a mapping",
    ):
        inject_stream(yaml.safe_dump(doc), OPTS)


def test_every_bad_document_is_reported_and_nothing_is_written() -> None:
    good, bad1, bad2 = _workload("Pod"), _workload("Deployment"), _workload("DaemonSet")
    bad1["spec"]["template"]["metadata"]["annotations"]["meshlet.io/upstreams"] = "api"
    bad2["spec"]["template"]["spec"]["containers"][0]["name"] = SIDECAR
    with pytest.raises(InjectError) as err:
        inject_stream(yaml.safe_dump_all([good, bad1, bad2]), OPTS)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "document 2 (Deployment web)",
        "document 3 (DaemonSet web)",
    ]


def test_invalid_yaml_is_refused_with_its_line() -> None:
    with pytest.raises(
        InjectError, match="not valid YAML: line 3, column 20: expected <block end>"
    ):
        inject_stream("apiVersion: v1\nkind: Pod\nmetadata: {name: x}}\n", OPTS)


def test_kubelet_variable_references_in_annotations_are_refused() -> None:
    """An annotation value reaches the init container's arguments, where the kubelet expands
    $(VAR): a service called $(POD_IP) (or any variable of the container) must not pass."""
    doc = _workload("Deployment")
    doc["spec"]["template"]["metadata"]["annotations"]["meshlet.io/service"] = "$(POD_IP)"
    with pytest.raises(InjectError, match=r"meshlet\.io/service: expected a service name"):
        inject_stream(yaml.safe_dump(doc), OPTS)
    doc["spec"]["template"]["metadata"]["annotations"].update(
        {"meshlet.io/service": "web", "meshlet.io/upstreams": "$(POD_NAME):9191"}
    )
    with pytest.raises(InjectError, match=r"meshlet\.io/upstreams: expected a service name"):
        inject_stream(yaml.safe_dump(doc), OPTS)


# ---- the command line --------------------------------------------------------------------------


def test_cli_reads_stdin_writes_output_and_refuses_with_exit_2(tmp_path: Path) -> None:
    text = yaml.safe_dump(_workload("StatefulSet"), sort_keys=False)
    out = tmp_path / "out.yaml"
    done = subprocess.run(
        [MESHLET, "inject", "-f", "-", "-o", str(out), "--image", "registry.example/m:1"],
        input=text,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == inject_stream(text, InjectOptions(image="registry.example/m:1"))

    src = tmp_path / "bad.yaml"
    bad = _workload("Deployment")
    bad["spec"]["template"]["spec"]["containers"][0]["name"] = SIDECAR
    src.write_text(yaml.safe_dump(bad))
    done = subprocess.run(
        [MESHLET, "inject", "-f", str(src)],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(
        f"meshlet inject: {src}: document 1 (Deployment web): "
        "spec.template.spec.containers[0].name: 'meshlet-sidecar'"
    )


def _kubelet_fields(pod_ip: str = "10.1.2.3") -> dict[str, str]:
    return {
        "metadata.name": "web-7d4b9c-x2x9q",
        "metadata.namespace": "shop",
        "status.podIP": pod_ip,
        "status.hostIP": "192.0.2.10",
    }


def test_injected_command_lines_parse_with_meshlets_own_parsers() -> None:
    (after,) = _inject(_workload("Deployment"))
    init, side = pod_template(after)["spec"]["initContainers"][:2]
    fields = _kubelet_fields()

    argv = command_line(init, container_env(init, fields))
    assert argv[0] == "meshlet"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "inject" and args.write_config == Path("/etc/meshlet/sidecar.yaml")
    assert (args.pod_name, args.pod_namespace, args.pod_ip) == (
        "web-7d4b9c-x2x9q",
        "shop",
        "10.1.2.3",
    )

    side_env = container_env(side, fields)
    assert side_env["CONSUL_HTTP_ADDR"] == "192.0.2.10:8500"
    argv = command_line(side, side_env)
    args = build_parser().parse_args(argv[1:])
    assert (argv[0], args.command, args.sidecar) == ("meshlet", "sidecar", True)
    assert args.config == args_of_init_config(init)

    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = side[name]["exec"]["command"]
        assert cmd[0] == "meshlet-probe"
        parsed = probe.build_parser().parse_args(cmd[1:])
        assert parsed.admin_addr == ADMIN_ADDRESS


def args_of_init_config(init: Mapping[str, Any]) -> Path:
    return Path(init["args"][init["args"].index("--write-config") + 1])


# ---- the probes hit the admin server's real routes ---------------------------------------------


class _Status:
    """The admin server's status source (a Protocol it takes by design), ready or not."""

    def __init__(self) -> None:
        self.ready = False

    def readiness(self) -> tuple[bool, tuple[str, ...]]:
        return self.ready, () if self.ready else ("upstream api: no snapshot yet",)

    def status(self, upstream: str | None) -> Mapping[str, Any]:
        return {}


async def _run_probe(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        MESHLET_PROBE, *argv, stderr=asyncio.subprocess.PIPE, env=ENV
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_probes_exec_the_admin_servers_ready_and_live_routes() -> None:
    (after,) = _inject(_workload("Pod"))
    side = after["spec"]["initContainers"][1]
    source = _Status()
    admin = AdminServer(source, "127.0.0.1", 0)
    await admin.start()
    try:

        def argv(name: str) -> list[str]:
            cmd = list(side[name]["exec"]["command"][1:])
            # The template's fixed admin port, moved to the one this test could bind.
            cmd[cmd.index("--admin-addr") + 1] = admin.address
            return cmd

        assert await _run_probe(*argv("livenessProbe")) == (0, "")
        code, err = await _run_probe(*argv("readinessProbe"))
        assert code == 1
        assert "/ready: 503" in err and "upstream api: no snapshot yet" in err
        source.ready = True
        assert await _run_probe(*argv("startupProbe")) == (0, "")
        assert await _run_probe(*argv("readinessProbe")) == (0, "")
    finally:
        await admin.close()
    code, err = await _run_probe(*argv("livenessProbe"))
    assert code == 1 and "Connection refused" in err


def test_probe_routes_are_the_admin_servers() -> None:
    # The admin module documents its routes; the probe may only name those.
    import agent.admin

    doc = agent.admin.__doc__ or ""
    for route in probe.ROUTES.values():
        assert f"GET {route} " in doc


# ---- an injected pod, run as the kubelet would -------------------------------------------------


@pytest.fixture
def dev() -> Iterator[str]:
    port = _free_port()
    proc = start_dev(port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_injected_pod_containers_register_the_service_and_get_ready(
    dev: str, tmp_path: Path
) -> None:
    """meshlet-init's and meshlet-sidecar's command lines and env, expanded as the kubelet
    expands them (pod IP 127.0.0.1, the node's Consul agent played by devstack), then the
    sidecar's startup probe. Only the paths of the mounts and the sidecar's fixed ports are
    moved into tmp_path and free ports (other tests share this machine)."""
    up_port = _free_port()
    doc = _workload("Deployment")
    doc["spec"]["template"]["metadata"]["annotations"]["meshlet.io/upstreams"] = f"api:{up_port}"
    host, _, consul_port = dev.rpartition(":")
    options = InjectOptions(image=OPTS.image, consul_http_addr=f"$(HOST_IP):{consul_port}")
    (after,) = _inject(doc, options)
    init, side = pod_template(after)["spec"]["initContainers"][:2]
    fields = _kubelet_fields(pod_ip="127.0.0.1") | {"status.hostIP": host}
    mounts = {
        "/etc/meshlet": str(tmp_path / "config"),
        "/var/run/secrets/meshlet/consul": str(tmp_path / "token"),
    }
    for d in mounts.values():
        Path(d).mkdir()
    (tmp_path / "token" / "token").write_text("")  # the Secret of a cluster without ACLs

    def localise(value: str) -> str:
        for mount, local in mounts.items():
            value = value.replace(mount, local)
        return value

    init_argv = [localise(a) for a in command_line(init, container_env(init, fields))]
    done = subprocess.run(
        [MESHLET, *init_argv[1:]], capture_output=True, check=False, text=True, timeout=60, env=ENV
    )
    assert done.returncode == 0, done.stderr
    config_file = tmp_path / "config" / "sidecar.yaml"
    written = yaml.safe_load(config_file.read_text())
    assert written["admin"]["address"] == ADMIN_ADDRESS
    assert written["sidecar"]["port"] == SIDECAR_PORT
    admin = f"127.0.0.1:{_free_port()}"
    written["admin"]["address"] = admin
    written["sidecar"]["port"] = _free_port()
    config_file.write_text(yaml.safe_dump(written))

    env = {k: localise(v) for k, v in container_env(side, fields).items()}
    side_argv = [localise(a) for a in command_line(side, env)]
    proc = Proc(side_argv[1:], env={**ENV, **env})
    try:
        startup = side["startupProbe"]
        cmd = list(startup["exec"]["command"])
        cmd[cmd.index("--admin-addr") + 1] = admin
        # The kubelet's startup probe: every periodSeconds, up to failureThreshold times.
        deadline = time.monotonic() + 60
        while True:
            code = subprocess.run(
                [MESHLET_PROBE, *cmd[1:]], capture_output=True, check=False, timeout=30, env=ENV
            ).returncode
            if code == 0:
                break
            assert proc.p.poll() is None, proc.p.communicate(timeout=10)[0]
            assert time.monotonic() < deadline, "the sidecar never got ready"
            time.sleep(startup["periodSeconds"])
        with urllib.request.urlopen(f"http://{dev}/v1/agent/services", timeout=10) as resp:
            services = json.loads(resp.read())
        svc = services["web-7d4b9c-x2x9q.shop"]
        assert (svc["Service"], svc["Address"], svc["Port"]) == ("web", "127.0.0.1", 8080)
        assert svc["Meta"] == {"k8s-namespace": "shop", "k8s-pod": "web-7d4b9c-x2x9q"}
        sidecar = services["web-7d4b9c-x2x9q.shop-sidecar-proxy"]
        assert sidecar["Proxy"]["Upstreams"][0]["DestinationName"] == "api"
        assert sidecar["Proxy"]["Upstreams"][0]["LocalBindPort"] == up_port
    finally:
        if proc.p.poll() is None:
            proc.p.send_signal(signal.SIGTERM)
        proc.stop()


def test_write_config_refuses_unexpanded_downward_api_values(tmp_path: Path) -> None:
    target = tmp_path / "sidecar.yaml"
    done = subprocess.run(
        [
            MESHLET,
            "inject",
            "--write-config",
            str(target),
            "--service",
            "web",
            "--service-port",
            "8080",
            "--pod-name",
            "$(POD_NAME)",
            "--pod-namespace",
            "shop",
            "--pod-ip",
            "10.1.2.3",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert done.returncode == 2
    assert "--pod-name: expected the pod's name, got '$(POD_NAME)'" in done.stderr
    assert not target.exists()


# ---- kubernetes/ -------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("path", sorted(p.relative_to(KUBE) for p in KUBE.rglob("*.yaml")), ids=str)
def test_every_manifest_in_kubernetes_validates(path: Path) -> None:
    docs = _docs(KUBE / path)
    assert docs
    for doc in docs:
        validate(doc)


def test_the_injected_example_is_what_meshlet_inject_writes() -> None:
    src = KUBE / "examples" / "web.yaml"
    out = KUBE / "examples" / "web.injected.yaml"
    assert out.read_text() == inject_stream(src.read_text(), InjectOptions()), (
        "regenerate: meshlet inject -f kubernetes/examples/web.yaml "
        "-o kubernetes/examples/web.injected.yaml"
    )


def _injector() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in _docs(KUBE / "injector.yaml")}


def test_injector_manifests_fit_together() -> None:
    kinds = _injector()
    deploy, service, hook = (
        kinds["Deployment"],
        kinds["Service"],
        kinds["MutatingWebhookConfiguration"],
    )
    ns = kinds["Namespace"]["metadata"]["name"]
    pod = deploy["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == deploy["spec"]["selector"]
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in port_names
    # The injector's own pods are never sent to it (no chicken-and-egg at start-up).
    assert pod["metadata"]["annotations"]["meshlet.io/inject"] == "false"
    for webhook in hook["webhooks"]:
        ref = webhook["clientConfig"]["service"]
        assert (ref["name"], ref["namespace"], ref["port"]) == (
            service["metadata"]["name"],
            ns,
            svc_port["port"],
        )
        assert ref["path"] == "/mutate"
        assert webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["sideEffects"] == "None"
        assert webhook["failurePolicy"] == "Fail"
        assert webhook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        excluded = webhook["namespaceSelector"]["matchExpressions"][0]
        assert excluded["operator"] == "NotIn"
        assert {ns, "kube-system"} <= set(excluded["values"])
    # No API access needed: the ServiceAccount mounts no token.
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "Role" not in kinds and "ClusterRole" not in kinds


def test_injector_command_line_parses_and_serves_the_listed_port() -> None:
    (container,) = _injector()["Deployment"]["spec"]["template"]["spec"]["containers"]
    argv = command_line(container, container_env(container, {}))
    assert argv[0] == "meshlet"
    args = build_parser().parse_args(argv[1:])
    assert args.webhook is True
    assert args.listen.rpartition(":")[2] == str(container["ports"][0]["containerPort"])
    # $$(HOST_IP) reaches the injector as $(HOST_IP): the injected sidecar's kubelet expands it.
    assert args.consul_http_addr == "$(HOST_IP):8500"
    mount = container["volumeMounts"][0]["mountPath"]
    assert str(args.tls_cert).startswith(mount) and str(args.tls_key).startswith(mount)
    for name in ("readinessProbe", "livenessProbe"):
        get = container[name]["httpGet"]
        assert (get["path"], get["scheme"], get["port"]) == ("/healthz", "HTTPS", "https")


def test_kubelet_expansion_helper_matches_the_documented_rules() -> None:
    env = {"A": "1"}
    assert expand("$(A)-$(B)-$$(A)", env) == "1-$(B)-$(A)"
    assert os.path.basename(MESHLET) == "meshlet"


# ---- docs/kubernetes.md ------------------------------------------------------------------------


def test_docs_commands_parse_and_links_stay_in_the_repository() -> None:
    import re
    import shlex

    doc = ROOT / "docs" / "kubernetes.md"
    text = doc.read_text()
    commands = [
        line.strip()
        for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)
        for line in block.splitlines()
        if line.strip().startswith("meshlet ")
    ]
    assert commands
    for line in commands:
        build_parser().parse_args(shlex.split(line)[1:])
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert "://" not in target, target
        assert (doc.parent / target.split("#")[0]).resolve().exists(), target
