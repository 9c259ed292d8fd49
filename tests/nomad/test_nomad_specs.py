"""nomad/*.nomad.hcl: the fields Nomad requires, and each task's command line through
meshlet's own argument parser (after Nomad's interpolation with test values)."""

from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import build_parser
from agent.config import parse
from tests.nomad.nomad_specs import (
    interpolate,
    labelled,
    load_job,
    mentions,
    one,
    render_template,
)

ALLOC = "5b7c3f60-4c4e-2a1f-9d3e-0b8f2c7a1e44"
# What Nomad gives a task, as test values (reference: client/taskenv/env.go).
TASK_ENV = {
    "NOMAD_ALLOC_ID": ALLOC,
    "NOMAD_GROUP_NAME": "api",
    "NOMAD_SECRETS_DIR": "/secrets",
    "NOMAD_TASK_DIR": "/local",
    "NOMAD_ALLOC_DIR": "/alloc",
    "NOMAD_UPSTREAM_ADDR_api": "127.0.0.1:9191",
    "NOMAD_PORT_http": "24001",
    "NOMAD_IP_http": "10.0.0.5",
    "NOMAD_PORT_mesh": "24002",
    "NOMAD_IP_mesh": "10.0.0.5",
    "NOMAD_PORT_admin": "24003",
    "NOMAD_PORT_api_upstream": "24004",
    "attr.unique.network.ip-address": "10.0.0.5",
    "node.unique.name": "client-1",
}
NOMAD_NAME = re.compile(r"[a-z0-9-]+")  # Nomad: service and group names lowercase


def meshlet_args(config: dict[str, Any], env: dict[str, str]) -> argparse.Namespace:
    """A task's command through `meshlet`'s parser, as the task would start it."""
    assert os.path.basename(config["command"]) == "meshlet", config
    args = [interpolate(a, env) for a in config["args"]]
    try:
        return build_parser().parse_args(args)
    except SystemExit as exc:  # argparse's way of refusing
        raise AssertionError(f"meshlet refuses {args}: exit {exc.code}") from None


def task_env(task: dict[str, Any], **nomad: str) -> dict[str, str]:
    """The task's environment: Nomad's variables (`nomad` overriding the test values) plus
    its `env` block, interpolated."""
    env = {**TASK_ENV, **nomad}
    for block in task.get("env", []):
        env.update({k: interpolate(v, TASK_ENV) for k, v in block.items()})
    return env


def rendered_config(task: dict[str, Any], args: argparse.Namespace, **nomad: str) -> Any:
    """The task's template rendered with its environment, where `-c` points at it."""
    template = one(task.get("template"), "template")
    assert args.config == Path("/local") / Path(template["destination"]).name
    assert template["destination"].startswith("local/")
    env = task_env(task, **nomad)
    return yaml.safe_load(render_template(template["data"], env))


# ---- the Connect job: meshlet as sidecar_task ------------------------------------------------


def _connect_groups() -> dict[str, dict[str, Any]]:
    name, job = load_job("web-api.nomad.hcl")
    assert name == "web-api" and job["type"] == "service" and job["datacenters"]
    return labelled(job["group"])


def test_connect_job_groups_have_bridge_network_and_a_connect_service() -> None:
    groups = _connect_groups()
    assert set(groups) == {"web", "api"}
    for group_name, group in groups.items():
        assert NOMAD_NAME.fullmatch(group_name)
        # Nomad rejects a Connect sidecar in any network mode but bridge or cni/*.
        network = one(group["network"], "network")
        assert network["mode"] == "bridge"
        # Nomad adds the sidecar's port itself, labelled connect-proxy-<service> (to = -1);
        # the job must not claim that label.
        assert not any(p.startswith("connect-proxy-") for p in labelled(network.get("port")))
        service = one(group["service"], "service")
        assert NOMAD_NAME.fullmatch(service["name"])
        connect = one(service["connect"], "connect")
        proxy = one(one(connect["sidecar_service"], "sidecar_service")["proxy"], "proxy")
        assert proxy["local_service_address"] == "127.0.0.1"
        assert int(proxy["local_service_port"]) == int(service["port"])
        # The app task exists and is not the sidecar.
        assert [t for t in labelled(group["task"])] == [group_name]


def test_connect_job_upstreams_name_a_service_and_bind_unique_ports() -> None:
    groups = _connect_groups()
    services = {one(g["service"], "service")["name"] for g in groups.values()}
    web = one(groups["web"]["service"], "service")
    proxy = one(one(one(web["connect"], "c")["sidecar_service"], "s")["proxy"], "proxy")
    upstreams = proxy["upstreams"]
    assert [u["destination_name"] for u in upstreams] == ["api"]
    assert set(u["destination_name"] for u in upstreams) <= services
    binds = [(u.get("local_bind_address", "127.0.0.1"), u["local_bind_port"]) for u in upstreams]
    assert len(binds) == len(set(binds))  # Nomad's rule: unique within the group
    # The app reaches api through the address Nomad derives from that upstream.
    env = one(labelled(groups["web"]["task"])["web"]["env"], "env")
    assert "${NOMAD_UPSTREAM_ADDR_api}" in env["API_URL"]


def test_connect_sidecar_task_runs_meshlet_sidecar_nomad_with_exec() -> None:
    for group in _connect_groups().values():
        connect = one(one(group["service"], "service")["connect"], "connect")
        task = one(connect["sidecar_task"], "sidecar_task")
        # A driver other than the default Envoy's docker: Nomad replaces the whole config,
        # so no Envoy flag is merged into meshlet's command line.
        assert task["driver"] == "exec"
        assert "lifecycle" not in task  # Nomad adds prestart + sidecar to its proxy task
        config = one(task["config"], "config")
        assert set(config) == {"command", "args"}
        env = task_env(task)
        assert env["CONSUL_HTTP_ADDR"] == "http://10.0.0.5:8500"
        args = meshlet_args(config, env)
        assert args.command == "sidecar" and args.nomad is True and args.sidecar is True
        assert args.config is None  # everything comes from Nomad
        assert args.bootstrap == Path("/secrets/envoy_bootstrap.json")
        # Nomad waits kill_timeout (default 5s) before SIGKILL.
        assert task["kill_timeout"].endswith("s")


def test_switching_back_to_envoy_is_deleting_the_sidecar_tasks() -> None:
    """Everything meshlet-specific lives in `sidecar_task`: without it, the job is a plain
    Connect job for Nomad's default Envoy sidecar."""
    _, job = load_job("web-api.nomad.hcl")
    envoy = copy.deepcopy(job)
    for group in envoy["group"]:
        for body in group.values():
            for service in body["service"]:
                for connect in service["connect"]:
                    connect.pop("sidecar_task")
    assert mentions(envoy, "meshlet") == []
    assert mentions(envoy, "sidecar_task") == []
    # And nothing of the kind is needed elsewhere: only sidecar_task blocks were removed.
    assert mentions(job, "meshlet") and all(
        ".sidecar_task[" in path for path in mentions(job, "meshlet")
    )


# ---- the plain-task alternative --------------------------------------------------------------


def test_lifecycle_job_runs_meshlet_as_prestart_sidecar_that_registers_itself() -> None:
    _, job = load_job("web-api-lifecycle.nomad.hcl")
    assert job["type"] == "service"
    groups = labelled(job["group"])
    assert set(groups) == {"web", "api"}
    for group_name, group in groups.items():
        assert "service" not in group  # meshlet registers the service and its sidecar
        network = one(group["network"], "network")
        ports = set(labelled(network["port"]))
        tasks = labelled(group["task"])
        sidecar = tasks["meshlet"]
        lifecycle = one(sidecar["lifecycle"], "lifecycle")
        assert lifecycle == {"hook": "prestart", "sidecar": True}
        args = meshlet_args(one(sidecar["config"], "config"), task_env(sidecar))
        assert args.command == "sidecar" and not args.nomad
        raw = rendered_config(sidecar, args)
        # Every port the template reads is one the group asks Nomad for.
        template = one(sidecar["template"], "template")["data"]
        read = set(re.findall(r'"NOMAD_(?:PORT|IP)_([a-z_]+)"', template))
        assert read <= ports, read - ports
        cfg = parse(raw, {})
        assert cfg.service.name == group_name
        assert cfg.service.id == f"{group_name}-{ALLOC}"  # unique per node and instance
        assert cfg.sidecar.port == int(TASK_ENV["NOMAD_PORT_mesh"])
        assert cfg.service.check is not None
        assert cfg.service.check.deregister_critical_service_after is not None
        # SIGTERM drains; Nomad must wait longer than the drain before SIGKILL.
        assert sidecar["kill_signal"] == "SIGTERM"
        assert float(sidecar["kill_timeout"].rstrip("s")) > cfg.shutdown.drain_period
        app = tasks[group_name]
        assert "lifecycle" not in app
    web = parse(
        rendered_config(
            labelled(groups["web"]["task"])["meshlet"],
            meshlet_args(
                one(labelled(groups["web"]["task"])["meshlet"]["config"], "c"), dict(TASK_ENV)
            ),
        ),
        {},
    )
    assert [(u.name, u.local_bind_port) for u in web.sidecar.upstreams] == [("api", 24004)]


# ---- meshlet agent on every client -----------------------------------------------------------


def test_system_job_runs_meshlet_agent_on_every_client() -> None:
    name, job = load_job("meshlet-agent.nomad.hcl")
    assert name == "meshlet-agent"
    assert job["type"] == "system"
    (group,) = labelled(job["group"]).values()
    (task,) = labelled(group["task"]).values()
    assert "lifecycle" not in task
    args = meshlet_args(one(task["config"], "config"), task_env(task))
    assert args.command == "agent" and not args.sidecar
    ports = labelled(one(group["network"], "network")["port"])
    static = str(ports["admin"]["static"])  # the same on every client: known to scrapers
    cfg = parse(rendered_config(task, args, NOMAD_PORT_admin=static), {})
    assert cfg.service.id == "node-exporter-client-1"  # one per client
    assert cfg.service.address == "10.0.0.5"
    assert cfg.admin.address == f"127.0.0.1:{static}"


@pytest.mark.parametrize(
    "spec", ["web-api.nomad.hcl", "web-api-lifecycle.nomad.hcl", "meshlet-agent.nomad.hcl"]
)
def test_every_task_has_resources_and_a_known_driver(spec: str) -> None:
    _, job = load_job(spec)
    for group in labelled(job["group"]).values():
        tasks = list(labelled(group.get("task")).values())
        for service in group.get("service", []):
            for connect in service.get("connect", []):
                tasks += connect.get("sidecar_task", [])
        assert tasks
        for task in tasks:
            assert task["driver"] in ("exec", "raw_exec", "docker")
            resources = one(task["resources"], "resources")
            assert resources["cpu"] > 0 and resources["memory"] > 0


# ---- docs/nomad.md ---------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "nomad.md"


def test_the_nomad_doc_links_only_inside_the_repository_and_its_commands_parse() -> None:
    text = DOC.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links
    for link in links:
        assert "://" not in link, f"link outside the repository: {link}"
        assert (DOC.parent / link.split("#")[0]).exists(), f"broken link: {link}"
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    commands = [line.split() for b in blocks for line in b.splitlines()]
    commands = [c for c in commands if c and c[0] == "meshlet"]
    assert commands
    for words in commands:
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:
            raise AssertionError(f"{' '.join(words)}: exit {exc.code}") from None
