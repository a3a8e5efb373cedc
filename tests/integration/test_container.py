"""The image and the compose file as shipped, built from the real Dockerfile and run for real with podman.

The image is built once per session by `make image` (the real Dockerfile, unchanged but for its
`PYTHON_IMAGE` argument: a stand-in base, see tests/containers.py) and run the way the Kubernetes
manifests run it: its own numeric user, a read-only root filesystem with nothing writable, every
capability dropped, no privilege escalation. Upstreams run on the host; a container reaches them as
`host.containers.internal`. Needs podman, runc and debootstrap (`.ci/run` installs them).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.clients import free_port
from tests.conftest import Upstream
from tests.containers import (
    COMPOSE_PROJECT,
    LOCKED_DOWN,
    ROOT,
    Built,
    Container,
    Podman,
    build_image,
    config_dir,
    running,
    standin_python,
    standin_redis,
)
from tests.tools import unavailable

pytestmark = pytest.mark.timeout(900)  # the first test builds the stand-in base (debootstrap) and the image
VIA = "1.1 bt-gateway"


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return Podman.for_tests(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def image(podman: Podman) -> Built:
    return build_image(podman)


def routed_to(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    """A ConfigMap-style config (both listeners on the container's network) routing to `upstream`."""
    host_port = upstream.url.split("://", 1)[1]
    return {
        "listen": {"host": "0.0.0.0", "port": 8080},
        "admin": {"host": "0.0.0.0", "port": 9901},
        "allowlist": [host_port],
        "routes": [{"name": "app", "prefix": "/", "upstream": upstream.url}],
        **extra,
    }


def run_args(config: Path) -> tuple[str, ...]:
    """`podman run` options: locked down as in the manifests, ports published on loopback only."""
    return (
        *LOCKED_DOWN,
        "-p",
        "127.0.0.1::8080",
        "-p",
        "127.0.0.1::9901",
        "-v",
        f"{config}:/etc/bt-gateway:ro",
    )


SERVE = ("serve", "-c", "/etc/bt-gateway/gateway.yaml", "--watch")  # the manifests' args


async def status_of(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as resp:
        await resp.read()
        return resp.status


async def until_ok(client: aiohttp.ClientSession, url: str, within_s: float = 60) -> None:
    """Poll `url` until it answers 200 (the container is starting); bounded."""
    async with asyncio.timeout(within_s):
        while True:
            try:
                if await status_of(client, url) == 200:
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def logged(container: Container, event: str, within_s: float = 30) -> dict[str, Any]:
    """The first `event` in the container's log, waiting for it (a hang guard, not a timing check)."""
    async with asyncio.timeout(within_s):
        while not (found := await asyncio.to_thread(container.events, event)):
            await asyncio.sleep(0.1)
    return found[0]


def process_status(container: Container) -> dict[str, str]:
    """/proc/1/status of the gateway (PID 1 in its container): who it runs as and what it may do."""
    lines = container.exec("cat", "/proc/1/status").splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def healthcheck(container: Container) -> subprocess.CompletedProcess[str]:
    """Run the image's HEALTHCHECK now (podman runs it on demand without systemd timers)."""
    return container.podman("healthcheck", "run", container.name, check=False)


def test_the_image_runs_as_a_numeric_user_the_kubelet_can_verify(podman: Podman, image: Built) -> None:
    found = podman.inspect_image(image.image)
    config = found["Config"]
    assert config["User"] == "10001:10001"  # runAsNonRoot refuses a named user it cannot check
    assert config["Entrypoint"] == ["bt-gateway"] and config["Cmd"] == ["serve"]
    assert found["Healthcheck"]["Test"] == ["CMD", "bt-gateway", "probe"]  # kept: docker format


async def test_the_image_serves_locked_down_through_published_ports(
    podman: Podman, image: Built, host_upstream: Upstream, tmp_path: Path
) -> None:
    config = config_dir(tmp_path, routed_to(host_upstream))
    with running(podman, image.image, *run_args(config), command=SERVE) as container:
        proxy = f"http://127.0.0.1:{container.port(8080)}"
        admin = f"http://127.0.0.1:{container.port(9901)}"
        async with aiohttp.ClientSession() as client:
            await until_ok(client, admin + "/healthz")
            assert await status_of(client, admin + "/readyz") == 200
            async with client.get(admin + "/status") as resp:  # the page is package data of the wheel
                assert resp.status == 200
                assert "<title>bt-gateway status</title>" in await resp.text()
            async with client.get(proxy + "/v1/ping", headers={"Authorization": "Bearer sk-1"}) as resp:
                assert resp.status == 200
                echo = await resp.json()
        assert echo["raw_path"] == "/v1/ping"
        [seen] = host_upstream.recorder.requests
        assert ("Via", VIA) in seen.headers
        status = process_status(container)
        assert status["Uid"].split() == ["10001"] * 4 and status["Gid"].split() == ["10001"] * 4
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"  # a seccomp filter, as RuntimeDefault
        assert healthcheck(container).returncode == 0  # the image's own HEALTHCHECK: healthy


async def test_stop_drains_in_flight_requests_within_the_bound_and_exits_0(
    podman: Podman, image: Built, host_upstream: Upstream, tmp_path: Path
) -> None:
    """`podman stop` sends SIGTERM, as the kubelet does: a stream in flight completes, a request that
    never ends is cut at `shutdown_timeout_s`, and the gateway exits 0 long before podman's own kill."""
    config = config_dir(tmp_path, routed_to(host_upstream, shutdown_timeout_s=2))
    with running(podman, image.image, *run_args(config), command=SERVE) as container:
        proxy = f"http://127.0.0.1:{container.port(8080)}"
        async with aiohttp.ClientSession() as client:
            await until_ok(client, f"http://127.0.0.1:{container.port(9901)}/healthz")
            stream = await client.get(proxy + "/sse")
            assert await stream.content.readuntil(b"\n\n") == b"data: first\n\n"
            hanging = asyncio.ensure_future(client.get(proxy + "/hang"))
            async with asyncio.timeout(15):
                while "/hang" not in host_upstream.recorder.started:
                    await asyncio.sleep(0.01)
            stop = asyncio.ensure_future(asyncio.to_thread(podman, "stop", "-t", "60", container.name))
            stopping = await logged(container, "gateway_stopping")
            assert stopping["in_flight"] == 2
            host_upstream.recorder.sse_gate.set()  # the stream finishes during the drain
            assert await stream.content.read() == b"data: second\n\n"
            stream.release()
            await stop
            with pytest.raises(aiohttp.ClientError):  # cut at the deadline, connection closed
                await (await hanging).read()
        state = container.state()
        assert state["ExitCode"] == 0 and not state["OOMKilled"]  # 137 would mean podman had to kill it
        # The cut reached the upstream too (its handler sees the close on a later turn of the loop).
        await asyncio.wait_for(host_upstream.recorder.disconnected.wait(), 15)
        events = [line["event"] for line in container.logs()]
        assert events[-1] == "gateway_stopped"
        cut = [a for a in container.events("access") if a["path"] == "/hang"]
        assert [a["error_code"] for a in cut] == ["shutting_down"]


async def test_a_config_that_binds_loopback_in_a_container_is_unhealthy_not_silent(
    podman: Podman, image: Built, tmp_path: Path
) -> None:
    """The development config (both listeners on 127.0.0.1) mounted over the image's: nothing outside
    the container reaches it, and the health check and the log say so instead of passing."""
    config = tmp_path / "dev-config"
    config.mkdir(mode=0o755)
    shutil.copy(ROOT / "config/gateway.yaml", config / "gateway.yaml")
    (config / "gateway.yaml").chmod(0o644)
    with running(podman, image.image, *run_args(config), command=SERVE) as container:
        warning = await logged(container, "admin_unreachable_from_outside")
        assert warning["admin"] == "127.0.0.1:9901"
        check = healthcheck(container)
        assert check.returncode != 0 and "unhealthy" in check.stdout
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.ClientError):
                await status_of(client, f"http://127.0.0.1:{container.port(9901)}/healthz")


# The sidecar manifest's placeholders, filled in with what an operator would write.
LOCK_VALUES = {
    "<POD_CIDR>": "10.244.0.0/16",
    "<SERVICE_CIDR>": "10.96.0.0/12",
    "<DNS_SERVICE_IP>": "10.96.0.10",
}
# sidecar.yaml's egress-lock securityContext in podman's words: root, a read-only root filesystem with
# nothing writable (no tmpfs on /run for an xtables lock file), every capability dropped but NET_ADMIN.
LOCK_CONTEXT = (*LOCKED_DOWN, "--user=0:0", "--cap-add=NET_ADMIN", "--network=none")
SHOW_RULES = 'bt-gateway "$@" && iptables-save -t filter && ip6tables-save -t filter'


def sidecar_lock_args() -> list[str]:
    docs = yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar.yaml").read_text())
    [pod] = [d["spec"]["template"]["spec"] for d in docs if d and d["kind"] == "Deployment"]
    [lock] = [c for c in pod["initContainers"] if c["args"][0] == "egress-lock"]
    args: list[str] = lock["args"]
    for placeholder, value in LOCK_VALUES.items():
        args = [arg.replace(placeholder, value) for arg in args]
    return args


def test_the_image_installs_the_egress_lock_as_the_sidecar_init_container_runs_it(
    podman: Podman, image: Built
) -> None:
    """The image carries iptables, and the init container's securityContext is enough: NET_ADMIN alone
    (no NET_RAW) and a read-only root filesystem (the nft backend writes no lock file)."""
    args = sidecar_lock_args()
    done = podman("run", "--rm", *LOCK_CONTEXT, "--entrypoint=sh", image.image, "-c", SHOW_RULES, "sh", *args)
    summary, *saved = done.stdout.splitlines()
    assert summary.startswith("egress-lock: chain BT-GATEWAY-EGRESS installed (IPv4 9 rules, IPv6 9 rules)")
    assert saved.count("-A OUTPUT -j BT-GATEWAY-EGRESS") == 2  # IPv4 and IPv6
    assert "-A BT-GATEWAY-EGRESS -m owner --uid-owner 10001 -j RETURN" in saved
    assert "-A BT-GATEWAY-EGRESS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j RETURN" in saved
    # As the image's own user (the gateway's securityContext) it cannot: one line, exit 1.
    refused = podman("run", "--rm", *LOCKED_DOWN, "--network=none", image.image, *args, check=False)
    assert refused.returncode == 1 and refused.stdout == ""
    [line] = [line for line in refused.stderr.splitlines() if not line.startswith("time=")]  # podman's own
    assert line.startswith("bt-gateway egress-lock: iptables-save failed with exit code 4: ")
    assert line.endswith("(needs root with CAP_NET_ADMIN in the pod's network namespace)")


def test_the_build_context_holds_only_what_the_image_needs(podman: Podman, tmp_path: Path) -> None:
    """.dockerignore keeps the venv, node_modules, tests and caches out of what `build` sends."""
    (tmp_path / "Containerfile").write_text(
        f"FROM {standin_python(podman)}\nCOPY . /ctx\n"
        'RUN echo "size=$(du -sk /ctx | cut -f1)" && cd /ctx && find . -type f | sort | sed "s/^/file=/"\n'
    )
    out = podman("build", "--no-cache", "-f", str(tmp_path / "Containerfile"), str(ROOT), timeout=300).stdout
    files = {line.removeprefix("file=./") for line in out.splitlines() if line.startswith("file=./")}
    [size_kb] = [int(line.removeprefix("size=")) for line in out.splitlines() if line.startswith("size=")]
    assert {f.split("/")[0] for f in files} == {
        "Dockerfile",
        "README.md",
        "deploy",
        "gateway",
        "pyproject.toml",
        "requirements-build.lock",
        "requirements.lock",
    }
    assert {f for f in files if f.startswith("deploy/")} == {"deploy/config/gateway.yaml"}
    assert not [f for f in files if "__pycache__" in f]
    assert size_kb < 1024, f"build context is {size_kb} KiB"


@pytest.fixture
def compose(podman: Podman) -> Iterator[list[str]]:
    """The podman-compose command line for the shipped compose file; brought down at the end."""
    binary = Path(sys.executable).parent / "podman-compose"
    if not binary.is_file():
        unavailable("podman-compose is not installed (make test installs it)")
    command = [str(binary), "-p", COMPOSE_PROJECT, "-f", str(ROOT / "deploy/compose.yaml")]
    yield command
    subprocess.run([*command, "down", "-t", "0"], env=podman.env, capture_output=True, timeout=120)


async def test_the_compose_file_works_from_the_host(
    podman: Podman, image: Built, compose: list[str], host_upstream: Upstream, tmp_path: Path
) -> None:
    """`up --build` on deploy/compose.yaml as shipped; an override file (compose's own mechanism) only
    replaces what no registry serves here (the base image, Redis) and points the app route at a host
    upstream. The probes go green with Redis reached, and a request from the host goes through."""
    host_port = host_upstream.url.split("://", 1)[1]
    override = tmp_path / "compose.override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "bt-gateway": {
                        "build": {"context": str(ROOT), "args": {"PYTHON_IMAGE": standin_python(podman)}},
                        "environment": {  # an env-only deployment: both planes on the host upstream
                            "BRAINTRUST_APP_URL": host_upstream.url,
                            "BT_GATEWAY_DATA_PLANE_URL": host_upstream.url,
                            "BT_GATEWAY_ALLOWLIST": host_port,
                        },
                    },
                    "redis": {"image": standin_redis(podman)},
                }
            }
        )
    )
    ports = {"BT_GATEWAY_PORT": str(free_port()), "BT_GATEWAY_ADMIN_PORT": str(free_port())}
    up = await asyncio.to_thread(
        subprocess.run,
        [*compose, "-f", str(override), "up", "-d", "--build"],
        env={**podman.env, **ports},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert up.returncode == 0, up.stderr[-2000:]
    proxy = f"http://127.0.0.1:{ports['BT_GATEWAY_PORT']}"
    admin = f"http://127.0.0.1:{ports['BT_GATEWAY_ADMIN_PORT']}"
    async with aiohttp.ClientSession() as client:
        await until_ok(client, admin + "/readyz")  # ready: the rate limit's Redis answers
        async with client.get(proxy + "/from-the-host", headers={"Authorization": "Bearer sk-1"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["raw_path"] == "/from-the-host"
    [seen] = host_upstream.recorder.requests
    assert ("Via", VIA) in seen.headers
    [name] = podman(
        "ps", "-q", "--filter", f"label=io.podman.compose.project={COMPOSE_PROJECT}",
        "--filter", "label=com.docker.compose.service=bt-gateway",
    ).stdout.split()  # fmt: skip
    gateway = Container(podman, name)
    assert healthcheck(gateway).returncode == 0
    assert gateway.events("gateway_started")[0]["config"] == "/etc/bt-gateway/gateway.yaml"
