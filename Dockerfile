# bt-gateway: slim runtime image, numeric non-root user, config at /etc/bt-gateway/gateway.yaml.
# The base image is pinned to a version tag; bump it deliberately (and pin a digest in your registry).
# Build: `make image` (docker or podman). Every Python package comes from the hashed locks
# (requirements.lock, requirements-build.lock; `make lock` regenerates both from pyproject.toml).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Build stages: published wheels only (no compiler), each checked against its hash in the lock. The
# dependencies go into a venv of their own, in a stage rebuilt only when the lock changes; the gateway's
# own wheel is built with the locked build tools.
FROM ${PYTHON_IMAGE} AS deps
COPY requirements.lock /tmp/
RUN python -m venv --without-pip /opt/bt-gateway \
    && pip --python /opt/bt-gateway/bin/python install --no-cache-dir --only-binary=:all: \
        --require-hashes --no-deps -r /tmp/requirements.lock

FROM ${PYTHON_IMAGE} AS app
WORKDIR /src
COPY requirements-build.lock ./
RUN pip install --no-cache-dir --only-binary=:all: --require-hashes -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /app .

# Runtime stage: no build tools, no pip cache, no source tree; the dependencies' venv is a layer of its
# own (the same path as where it was built, so its scripts and bytecode point where they are).
FROM ${PYTHON_IMAGE}
# iptables (nft backend) for `bt-gateway egress-lock`, the sidecar pattern's init container that keeps
# every other UID of the pod off the network (deploy/kubernetes/sidecar.yaml). Only that container runs
# it, as root with NET_ADMIN; the gateway itself never does.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
# A numeric user and group: Kubernetes' runAsNonRoot can only verify a numeric USER (the manifests in
# deploy/ name the same 10001:10001; tests/integration/test_deploy.py keeps them in step).
RUN groupadd --gid 10001 bt-gateway \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init --shell /usr/sbin/nologin bt-gateway
COPY --from=deps /opt/bt-gateway /opt/bt-gateway
COPY --from=app /app /app
RUN pip --python /opt/bt-gateway/bin/python install --no-cache-dir --no-index --no-deps /app/*.whl \
    && rm -rf /app && pip --python /opt/bt-gateway/bin/python check
# The container config: both listeners face the container's network, so published ports and probes
# reach them. A file, not an environment variable, so a config mounted over it still decides.
COPY deploy/config/gateway.yaml /etc/bt-gateway/gateway.yaml
ENV PATH=/opt/bt-gateway/bin:$PATH \
    BT_GATEWAY_CONFIG=/etc/bt-gateway/gateway.yaml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080 9901
# Probes the admin listener where the outside reaches it (the container's own address, not loopback):
# a config that binds the admin listener to 127.0.0.1 shows as unhealthy instead of passing unseen.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["bt-gateway", "probe"]
ENTRYPOINT ["bt-gateway"]
CMD ["serve"]
