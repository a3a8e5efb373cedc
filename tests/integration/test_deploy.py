"""The deployment kit: every gateway config it embeds passes the real `check-config`, with the env beside it.

No cluster and no Docker engine run here, so the manifests are checked for what can go wrong in them: a
config the gateway refuses, probes on the wrong port, a grace period shorter than the drain, an image
default that overrides the mounted config.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
CONFIG_DIR = "/etc/bt-gateway"


def check_config(path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run the real CLI; return the effective config it printed."""
    script = str(Path(sys.executable).parent / "bt-gateway")
    result = subprocess.run(
        [script, "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"config ok: {path}\n"
    effective: dict[str, Any] = yaml.safe_load(result.stdout)
    return effective


def gateway_pods(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(pod spec, gateway container, its ConfigMap) for every workload running `bt-gateway serve`."""
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    found = []
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            if container.get("args", [None])[0] == "serve":
                [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR]
                [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
                found.append((pod, container, config_maps[volume["configMap"]["name"]]))
    return found


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_runs_a_config_the_gateway_accepts(manifest: Path, tmp_path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    pods = gateway_pods(docs)
    assert pods, "no container runs `bt-gateway serve`"
    for pod, container, config_map in pods:
        path = tmp_path / "gateway.yaml"
        path.write_text(config_map["data"]["gateway.yaml"])
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        config = check_config(path, env)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["admin"] == config["admin"]["port"] and config["admin"]["host"] == "0.0.0.0"
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        drain = config["shutdown_delay_s"] + config["shutdown_timeout_s"]
        assert pod["terminationGracePeriodSeconds"] >= drain + 5
        assert config["shutdown_delay_s"] > 0
        if container.get("restartPolicy") == "Always":  # a sidecar: the app dials it on loopback
            app_env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
            assert app_env["BRAINTRUST_APP_URL"] == f"http://127.0.0.1:{config['listen']['port']}"
            assert config["listen"]["host"] == "127.0.0.1"  # nothing outside the pod reaches the proxy


def test_the_replicas_share_one_redis_limit() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/replicas-redis.yaml").read_text()) if d]
    [(pod, _, config_map)] = gateway_pods(docs)
    config = yaml.safe_load(config_map["data"]["gateway.yaml"])
    redis_services = [
        d["metadata"]["name"] for d in docs if d["kind"] == "Service" and "redis" in d["metadata"]["name"]
    ]
    assert config["rate_limit"]["storage"].startswith(f"redis://{redis_services[0]}.")
    [deployment] = [d for d in docs if d["kind"] == "Deployment" and d["spec"]["template"]["spec"] is pod]
    assert deployment["spec"]["replicas"] > 1


def test_compose_runs_the_shipped_config_against_its_redis(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    service = compose["services"]["bt-gateway"]
    [volume] = [v for v in service["volumes"] if v.split(":")[1] == f"{CONFIG_DIR}/gateway.yaml"]
    source = (ROOT / "deploy" / volume.split(":")[0]).resolve()
    config = check_config(source, dict(service["environment"]))
    assert config["rate_limit"]["storage"] == "redis://redis:6379/0"
    assert "redis" in compose["services"]


def test_the_image_config_faces_the_container_network_and_stays_overridable(tmp_path: Path) -> None:
    """The Dockerfile edits its copy of the shipped config (no ENV that would beat a mounted config)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim", dockerfile, re.M)  # pinned tag
    assert "BT_GATEWAY_LISTEN_HOST" not in dockerfile and "BT_GATEWAY_ADMIN_HOST" not in dockerfile
    assert dockerfile.index("--wheel-dir /deps") < dockerfile.index("COPY gateway ")  # deps layer first
    [script] = re.findall(r"sed -i '([^']+)'", dockerfile)
    image_config = tmp_path / "gateway.yaml"
    image_config.write_text((ROOT / "config/gateway.yaml").read_text())
    subprocess.run(["sed", "-i", script, str(image_config)], check=True)
    config = check_config(image_config, {})
    assert (config["listen"]["host"], config["admin"]["host"]) == ("0.0.0.0", "0.0.0.0")


def test_the_license_is_the_one_pyproject_names() -> None:
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
