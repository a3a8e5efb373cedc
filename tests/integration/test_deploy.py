"""The deployment kit's files agree with each other: configs the gateway accepts, one user everywhere.

No cluster runs here, so the manifests are checked for what can go wrong in them: a config the gateway
refuses, probes on the wrong port, a grace period shorter than the drain, a securityContext the image does
not satisfy, a NetworkPolicy that lets something other than the gateway out, a lock that no longer pins
what pyproject.toml asks for. The image and the compose file are built and run for real in
test_container.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.tls_files import CERT, KEY, issue, leaf_pems

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
CONFIG_DIR = "/etc/bt-gateway"
# The image's own config serves both modes to anyone its ports reach, as a quick start; it says so.
CONTAINER_WARNINGS = ("admin.token", "forward_proxy.auth", "forward_proxy.tunnel_to_limited_hosts")
UNREACHABLE_REDIS = ("rate_limit.storage",)  # no Redis answers here: said once, and the config is still ok
SECRET_STAND_IN = "stand-in-for-the-secret-0123456789"  # a secretKeyRef has no value in a manifest
TLS_SECRET = "bt-gateway-tls"


def check_config(path: Path, env: dict[str, str], warnings: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the real CLI; return the effective config it printed. `warnings`: the keys of the warning lines
    (`warning: FILE:LINE: key: message`) it must print before `config ok`, in order."""
    script = str(Path(sys.executable).parent / "bt-gateway")
    result = subprocess.run(
        [script, "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert result.returncode == 0, result.stderr
    *warned, ok = result.stderr.splitlines()
    assert ok == f"config ok: {path}"
    assert [line.split(": ")[2] for line in warned] == list(warnings), result.stderr
    assert [line for line in warned if not line.startswith((f"warning: {path}:", "warning: env "))] == []
    effective: dict[str, Any] = yaml.safe_load(result.stdout)
    return effective


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: literal values, and a stand-in for each value read from a Secret."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            env[entry["name"]] = SECRET_STAND_IN
    return env


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


def secret_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """{mount path: Secret name} for every Secret volume the container mounts."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    return {m["mountPath"]: secrets[m["name"]] for m in container["volumeMounts"] if m["name"] in secrets}


def with_secrets_in(text: str, mounts: dict[str, str], ca: trustme.CA, tmp_path: Path) -> str:
    """The config with each mounted Secret's directory replaced by a temporary one holding what a
    `kubernetes.io/tls` Secret holds (a throwaway certificate from the test CA as tls.crt and tls.key):
    the real `check-config` then loads a real pair at the manifest's file names."""
    for index, mount in enumerate(mounts):
        directory = tmp_path / f"secret-{index}"
        directory.mkdir()
        cert, key = leaf_pems(issue(ca))
        (directory / CERT).write_bytes(cert)
        (directory / KEY).write_bytes(key)
        text = text.replace(f"{mount}/", f"{directory}/")
    return text


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_runs_a_config_the_gateway_accepts(
    manifest: Path, tmp_path: Path, test_ca: trustme.CA
) -> None:
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    pods = gateway_pods(docs)
    assert pods, "no container runs `bt-gateway serve`"
    for pod, container, config_map in pods:
        path = tmp_path / "gateway.yaml"
        mounts = secret_mounts(pod, container)
        path.write_text(with_secrets_in(config_map["data"]["gateway.yaml"], mounts, test_ca, tmp_path))
        # Only a container without a token from a Secret serves POST /reload nowhere (it says so).
        env = container_env(container)
        warned = () if "BT_GATEWAY_ADMIN_TOKEN" in env else ("admin.token",)
        if "redis" in config_map["data"]["gateway.yaml"]:
            warned += UNREACHABLE_REDIS
        config = check_config(path, env, warned)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["admin"] == config["admin"]["port"] and config["admin"]["host"] == "0.0.0.0"
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        # A ConfigMap edit reaches a directory mount (never a subPath one) as a new file: --watch reloads.
        assert container["args"] == ["serve", "-c", f"{CONFIG_DIR}/gateway.yaml", "--watch"]
        assert [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR and "subPath" not in m]
        drain = config["shutdown_delay_s"] + config["shutdown_timeout_s"]
        assert pod["terminationGracePeriodSeconds"] >= drain + 5
        assert config["shutdown_delay_s"] > 0
        if container.get("restartPolicy") == "Always":  # a sidecar: the app dials it on loopback
            app_env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
            assert app_env["BRAINTRUST_APP_URL"] == f"http://127.0.0.1:{config['listen']['port']}"
            assert config["listen"]["host"] == "127.0.0.1"  # nothing outside the pod reaches the proxy


def test_the_shared_service_is_reverse_mode_only_and_its_reload_needs_a_token(
    tmp_path: Path, test_ca: trustme.CA
) -> None:
    """Anyone reaching the proxy port of a forward proxy without auth tunnels to the allow-listed hosts:
    the shared service is reverse-only. The admin token comes from a Secret; without the Secret the pods
    still start (probes, metrics, --watch) and check-config says POST /reload is off."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/replicas-redis.yaml").read_text()) if d]
    [(pod, container, config_map)] = gateway_pods(docs)
    path = tmp_path / "gateway.yaml"
    mounts = secret_mounts(pod, container)
    path.write_text(with_secrets_in(config_map["data"]["gateway.yaml"], mounts, test_ca, tmp_path))
    assert container["env"][0] == {
        "name": "BT_GATEWAY_ADMIN_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "bt-gateway-admin", "key": "token", "optional": True}},
    }
    config = check_config(path, container_env(container), UNREACHABLE_REDIS)  # the Secret exists
    assert config["forward_proxy"]["enabled"] is False
    assert config["admin"]["token"] == "***"
    check_config(path, {}, ("admin.token", *UNREACHABLE_REDIS))  # no Secret: reload is off, and said to be


def test_the_replicas_speak_tls_with_the_certificate_of_a_mounted_secret() -> None:
    """The shared service carries every app's API key across the cluster network: only over TLS."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/replicas-redis.yaml").read_text()) if d]
    [(pod, container, config_map)] = gateway_pods(docs)
    config = yaml.safe_load(config_map["data"]["gateway.yaml"])
    tls = config["listen"]["tls"]
    [(mount, secret)] = secret_mounts(pod, container).items()
    assert secret == TLS_SECRET
    # The Secret's own key names, in a directory mount (a subPath mount never sees a renewal).
    assert (tls["cert_file"], tls["key_file"]) == (f"{mount}/{CERT}", f"{mount}/{KEY}")
    assert [m for m in container["volumeMounts"] if m["mountPath"] == mount and "subPath" not in m]
    assert not mount.startswith(CONFIG_DIR + "/")  # no mount point inside the read-only ConfigMap volume
    assert config["advertise_url"] == "https://bt-gateway.egress.svc:8080"
    # The files are readable by the gateway's group only.
    [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == TLS_SECRET]
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsGroup"]


def test_the_replicas_share_one_redis_limit() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/replicas-redis.yaml").read_text()) if d]
    [(pod, _, config_map)] = gateway_pods(docs)
    config = yaml.safe_load(config_map["data"]["gateway.yaml"])
    redis_services = [
        d["metadata"]["name"] for d in docs if d["kind"] == "Service" and "redis" in d["metadata"]["name"]
    ]
    assert config["rate_limit"]["storage"].startswith(f"redis://{redis_services[0]}.")
    assert "password" not in config["rate_limit"]  # the YAML never holds it: a Secret, through the env
    secret = {"secretKeyRef": {"name": "bt-gateway-redis", "key": "password"}}
    [gateway_container] = pod["containers"]
    assert {"name": "BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD", "valueFrom": secret} in gateway_container["env"]
    [redis_pod] = [
        d["spec"]["template"]["spec"]
        for d in docs
        if d["metadata"]["name"] == "bt-gateway-redis" and d["kind"] == "Deployment"
    ]
    [redis] = redis_pod["containers"]
    assert {"name": "REDIS_PASSWORD", "valueFrom": secret} in redis["env"]
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment" and d["spec"]["template"]["spec"] is pod]
    assert deployment["spec"]["replicas"] > 1


def test_compose_runs_the_container_config_against_its_redis(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    service = compose["services"]["bt-gateway"]
    # The directory is mounted, not the file: an edit saved by rename reaches the container, --watch sees it.
    [volume] = [v for v in service["volumes"] if v.split(":")[1] == CONFIG_DIR]
    assert service["command"] == ["serve", "-c", f"{CONFIG_DIR}/gateway.yaml", "--watch"]
    source = (ROOT / "deploy" / volume.split(":")[0] / "gateway.yaml").resolve()
    assert source == ROOT / "deploy/config/gateway.yaml"  # the container config, not the loopback one
    assert [p.name for p in source.parent.iterdir()] == ["gateway.yaml"]  # nothing else is exposed
    config = check_config(source, dict(service["environment"]), CONTAINER_WARNINGS + UNREACHABLE_REDIS)
    assert (config["listen"]["host"], config["admin"]["host"]) == ("0.0.0.0", "0.0.0.0")
    assert config["rate_limit"]["storage"] == "redis://redis:6379/0"
    assert "redis" in compose["services"]


def test_the_image_carries_the_container_config_and_sets_nothing_over_it() -> None:
    """The image's config is a file (deploy/config/gateway.yaml), so a config mounted over it decides."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim", dockerfile, re.M)  # pinned tag
    assert f"COPY deploy/config/gateway.yaml {CONFIG_DIR}/gateway.yaml" in dockerfile
    assert "BT_GATEWAY_LISTEN_HOST" not in dockerfile and "BT_GATEWAY_ADMIN_HOST" not in dockerfile
    config = check_config(ROOT / "deploy/config/gateway.yaml", {}, CONTAINER_WARNINGS)
    assert (config["listen"]["host"], config["admin"]["host"]) == ("0.0.0.0", "0.0.0.0")
    assert (config["listen"]["port"], config["admin"]["port"]) == (8080, 9901)
    assert "EXPOSE 8080 9901" in dockerfile


def image_user() -> tuple[int, int]:
    [(uid, gid)] = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    return int(uid), int(gid)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_every_gateway_container_runs_as_the_images_numeric_user_locked_down(manifest: Path) -> None:
    """The kubelet verifies runAsNonRoot only against a numeric user: the image's, named the same here."""
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    for _, container, _ in gateway_pods(docs):
        assert container["securityContext"] == {
            "runAsUser": uid,
            "runAsGroup": gid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }


LOCK_PLACEHOLDERS = ["<POD_CIDR>", "<SERVICE_CIDR>", "<DNS_SERVICE_IP>:53"]


def egress_lock(pod: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The pod's one `egress-lock` init container, and its index among the init containers."""
    inits = pod.get("initContainers", [])
    [(index, lock)] = [(i, c) for i, c in enumerate(inits) if c.get("args", [None])[0] == "egress-lock"]
    return index, lock


def test_in_the_sidecar_pattern_an_init_container_locks_the_pod_to_the_gateways_uid() -> None:
    """Before the gateway starts, `egress-lock` names the gateway's UID, the image's USER; it runs as
    root with NET_ADMIN alone (nothing writable), and the app cannot undo it or slip under it."""
    uid, _ = image_user()
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar.yaml").read_text()) if d]
    [(pod, gateway, _)] = gateway_pods(docs)
    index, lock = egress_lock(pod)
    assert index < pod["initContainers"].index(gateway) and "restartPolicy" not in lock  # runs to completion
    assert lock["image"] == gateway["image"]
    assert lock["args"] == [
        "egress-lock",
        f"--gateway-uid={uid}",
        *(f"--allow={p}" for p in LOCK_PLACEHOLDERS),
    ]
    assert gateway["securityContext"]["runAsUser"] == uid
    assert lock["securityContext"] == {
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "volumeMounts" not in lock  # iptables' nft backend needs no writable /run (test_container.py)
    for app in pod["containers"]:  # NET_ADMIN would undo the lock, NET_RAW's packet sockets skip it
        context = app["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"]} and context["allowPrivilegeEscalation"] is False
        assert context.get("runAsUser") != uid


def test_compose_runs_the_gateway_as_the_images_user_locked_down() -> None:
    uid, gid = image_user()
    service = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())["services"]["bt-gateway"]
    assert service["user"] == f"{uid}:{gid}"
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert service["security_opt"] == ["no-new-privileges:true"]


def policies(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}


DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def test_in_the_replicas_pattern_only_the_gateway_pods_reach_the_internet() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/replicas-redis.yaml").read_text()) if d]
    specs = policies(docs)
    [(pod, container, _)] = gateway_pods(docs)
    [gateway] = [d for d in docs if d["kind"] == "Deployment" and d["spec"]["template"]["spec"] is pod]
    gateway_labels = gateway["spec"]["template"]["metadata"]["labels"]
    proxy_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "proxy")
    # Every pod the kit runs is under an egress policy, and none holds an API token it never uses.
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(
            "Egress" in spec["policyTypes"] and spec["podSelector"]["matchLabels"].items() <= labels.items()
            for spec in specs.values()
        ), deployment["metadata"]["name"]
    # Only a policy selecting the gateway pods opens anything by address, and never the private ranges.
    for name, spec in specs.items():
        blocks = [
            peer["ipBlock"] for rule in spec.get("egress", []) for peer in rule["to"] if "ipBlock" in peer
        ]
        if blocks:
            assert spec["podSelector"]["matchLabels"] == gateway_labels, name
            assert [block["cidr"] for block in blocks] == ["0.0.0.0/0", "::/0"]
            assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(blocks[0]["except"])
            assert {"fc00::/7", "::ffff:0:0/96"} <= set(blocks[1]["except"])
    # In an application namespace, every pod (not only labelled ones) reaches the proxy port and DNS only.
    app_policy = ROOT / "deploy/kubernetes/app-namespace/egress-through-bt-gateway.yaml"
    [app] = [d for d in yaml.safe_load_all(app_policy.read_text()) if d]
    client = app["spec"]
    assert "namespace" not in app["metadata"]  # `kubectl apply -n <namespace>` places it
    assert client["podSelector"] == {} and client["policyTypes"] == ["Egress"]
    [to_gateway, to_dns] = client["egress"]
    [peer] = to_gateway["to"]
    assert peer["podSelector"]["matchLabels"] == gateway_labels
    namespace = gateway["metadata"]["namespace"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    assert to_gateway["ports"] == [{"protocol": "TCP", "port": proxy_port}]
    assert to_dns["ports"] == DNS_PORTS and "ipBlock" not in to_dns["to"][0]
    # The gateway takes proxy traffic from clients only.
    [gateway_policy] = [s for s in specs.values() if s["podSelector"]["matchLabels"] == gateway_labels]
    [from_clients] = [
        r for r in gateway_policy["ingress"] if {"protocol": "TCP", "port": proxy_port} in r["ports"]
    ]
    assert [p["podSelector"]["matchLabels"] for p in from_clients["from"]] == [{"bt-gateway-client": "true"}]


def lock_pins(path: Path) -> dict[str, tuple[str, str | None, list[str], int]]:
    """pip-compile's output: name -> (version, marker, the `via` names, hash count)."""
    pins: dict[str, tuple[str, str | None, list[str], int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        entry = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)(?: ; (.+?))? \\$", line)
        if entry:
            name = canonicalize_name(entry[1])
            pins[name] = (entry[2], entry[3], [], 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            version, marker, via, hashes = pins[name]
            pins[name] = (version, marker, via, hashes + 1)
        elif name and (via := re.match(r"^ {4}#(?: via)? +(\S.*)$", line)):
            pins[name][2].append(via[1].removeprefix("via ").strip())
    return pins


def test_the_lock_pins_exactly_what_pyproject_asks_for() -> None:
    """`make lock` after any change to the dependencies: the image installs the lock, not pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = lock_pins(ROOT / "requirements.lock")
    build = lock_pins(ROOT / "requirements-build.lock")
    for pins, wanted, via in (
        (runtime, project["project"]["dependencies"], "bt-gateway (pyproject.toml)"),
        (build, project["build-system"]["requires"], "bt-gateway (pyproject.toml::build-system.requires)"),
    ):
        asked = {canonicalize_name(r.name): r for r in map(Requirement, wanted)}
        direct = {name for name, (_, _, vias, _) in pins.items() if via in vias}
        assert direct == set(asked), "the lock's direct dependencies differ from pyproject's: run make lock"
        for name, requirement in asked.items():
            version, marker, _, _ = pins[name]
            assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version}"
            assert marker == (str(requirement.marker) if requirement.marker else None), name
        assert asked and [name for name, (_, _, _, hashes) in pins.items() if hashes == 0] == []


def test_the_license_is_the_one_pyproject_names() -> None:
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
