"""Podman as it runs on these machines, for the tests that build and run the real image and compose file.

The quirks live here and nowhere else: runc with cgroupfs and explicit ulimits (the runtime's defaults are
refused), set in a `containers.conf` of the suite's own (CONTAINERS_CONF), so no system file is touched;
the docker image format, which keeps HEALTHCHECK. No registry serves base images here, so the Dockerfile's
`PYTHON_IMAGE` argument gets a stand-in built from Debian packages (debootstrap; bookworm, as in
python:3.11-slim-bookworm) with a venv at /usr/local, so `python` and `pip` are where the slim image has
them. It carries this machine's CA bundle and points pip at it: PyPI is reached through a TLS-inspecting
proxy. Stand-ins are cached in podman's store under tags that hash their recipe, so later runs skip them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.tools import require_binaries

ROOT = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Names of this checkout's own, so that two checkouts testing at once never use each other's image or
# compose project; fixed per checkout, so each run replaces the last one's instead of piling up.
CHECKOUT = hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]
IMAGE = f"localhost/bt-gateway:test-{CHECKOUT}"
COMPOSE_PROJECT = f"bt-gateway-test-{CHECKOUT}"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
DEBOOTSTRAP = ("--variant=minbase", "--include=python3,python3-venv,ca-certificates", SUITE)
PYTHON_RECIPE = """\
FROM {rootfs}
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /usr/local && /usr/local/bin/pip --version
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \\
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
CMD ["python3"]
"""
# compose's `redis:7.4.2-alpine` cannot be pulled either: Debian's redis-server stands in for it.
REDIS_RECIPE = """\
FROM {rootfs}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/*
CMD ["redis-server"]
"""


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class Podman:
    """`podman` with the suite's containers.conf; every call has a timeout and says what failed."""

    env: dict[str, str]

    @classmethod
    def for_tests(cls, workdir: Path) -> Podman:
        require_binaries("podman", "runc", "debootstrap")
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        return cls({**os.environ, "CONTAINERS_CONF": str(conf), "BUILDAH_FORMAT": "docker"})

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def build(self, context: Path, tag: str, *args: str, timeout: float = 900) -> str:
        self("build", "-t", tag, *args, str(context), timeout=timeout)
        return tag

    def inspect_image(self, image: str) -> dict[str, Any]:
        [found] = json.loads(self("image", "inspect", image).stdout)
        return dict(found)


def _rootfs(podman: Podman) -> str:
    """Debian's minimal root filesystem with python3, imported as an image (the slow part, cached)."""
    tag = f"localhost/bt-gateway-test/rootfs:{SUITE}-{_digest(*DEBOOTSTRAP)}"
    if podman.exists(tag):
        return tag
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", *DEBOOTSTRAP, str(rootfs)], check=True, capture_output=True, timeout=900
        )
        archive = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True, timeout=300)
        podman("import", str(archive), tag, timeout=300)
    return tag


def _standin(podman: Podman, name: str, recipe: str, files: dict[str, bytes]) -> str:
    rootfs = _rootfs(podman)
    containerfile = recipe.format(rootfs=rootfs)
    tag = f"localhost/bt-gateway-test/{name}:{SUITE}-{_digest(containerfile, *files.values())}"
    if podman.exists(tag):
        return tag
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp)
        (context / "Containerfile").write_text(containerfile)
        for file, content in files.items():
            (context / file).write_bytes(content)
        return podman.build(context, tag)


def standin_python(podman: Podman) -> str:
    """The stand-in for `python:3.11.11-slim-bookworm`: python, pip and a venv at /usr/local."""
    return _standin(podman, "python", PYTHON_RECIPE, {"ca-certificates.crt": CA_BUNDLE.read_bytes()})


def standin_redis(podman: Podman) -> str:
    """The stand-in for compose's `redis:7.4.2-alpine`: Debian's redis-server on the same base."""
    return _standin(podman, "redis", REDIS_RECIPE, {})


@dataclass(frozen=True)
class Built:
    image: str
    seconds: float  # how long `make image` took this run (cached layers make a rebuild quick)


def build_image(podman: Podman) -> Built:
    """The real Dockerfile, built by `make image` exactly as users run it, with the stand-in base."""
    base = standin_python(podman)
    started = time.monotonic()
    subprocess.run(
        ["make", "-s", "image", f"IMAGE={IMAGE}", f"PYTHON_IMAGE={base}", "ENGINE=podman"],
        cwd=ROOT,
        env=podman.env,
        check=True,
        capture_output=True,
        timeout=900,
    )
    return Built(IMAGE, time.monotonic() - started)


def config_dir(parent: Path, config: dict[str, Any]) -> Path:
    """A directory holding gateway.yaml, readable by the image's user (as a ConfigMap volume is)."""
    directory = parent / f"config-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
    directory.chmod(0o755)
    (directory / "gateway.yaml").chmod(0o644)
    return directory


# How the Kubernetes manifests run the gateway container (securityContext), in podman's words. No
# `--user`: the image's own numeric USER is what runAsNonRoot checks. `--read-only-tmpfs=false`: no
# writable /tmp or /run either, as with readOnlyRootFilesystem and no emptyDir.
LOCKED_DOWN = (
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
)


@dataclass
class Container:
    podman: Podman
    name: str

    def port(self, container_port: int) -> int:
        """The host port published for `container_port` (podman picked it)."""
        mapping = self.podman("port", self.name, f"{container_port}/tcp").stdout.strip()
        return int(mapping.rsplit(":", 1)[1])

    def logs(self) -> list[dict[str, Any]]:
        out = self.podman("logs", self.name).stdout.splitlines()
        return [json.loads(line) for line in out if line.startswith("{")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.logs() if line.get("event") == name]

    def state(self) -> dict[str, Any]:
        [found] = json.loads(self.podman("container", "inspect", self.name).stdout)
        return dict(found["State"])

    def exec(self, *command: str) -> str:
        return self.podman("exec", self.name, *command).stdout


@contextlib.contextmanager
def running(podman: Podman, image: str, *args: str, command: tuple[str, ...] = ()) -> Iterator[Container]:
    """`podman run -d` with `args`; the container is removed at the end whatever happened."""
    name = f"bt-gateway-test-{uuid.uuid4().hex[:10]}"
    podman("run", "-d", "--name", name, *args, image, *command)
    try:
        yield Container(podman, name)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
