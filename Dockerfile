# bt-gateway: slim runtime image, non-root, config at /etc/bt-gateway/gateway.yaml.
# The base image is pinned to a version tag; bump it deliberately (and pin a digest in your registry).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Build stage: wheels for the dependencies first (their own layer, rebuilt only when pyproject.toml
# changes), then the gateway's own wheel. uvloop, brotli and zstandard may need a compiler.
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
RUN mkdir gateway && echo '__version__ = "0"' > gateway/__init__.py \
    && pip wheel --no-cache-dir --wheel-dir /deps . && rm /deps/bt_gateway-*.whl
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /app .

# Runtime stage: no compiler, no pip cache, no source tree; dependencies in a layer of their own.
FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --no-create-home bt-gateway
COPY --from=build /deps /deps
RUN pip install --no-cache-dir --no-index /deps/*.whl && rm -rf /deps
COPY --from=build /app /app
RUN pip install --no-cache-dir --no-index --no-deps /app/*.whl && rm -rf /app
# In a container both listeners face the container's network (probes and port publishing need it).
# This is the image's config file, not an environment variable, so a mounted config still decides.
COPY config/gateway.yaml /etc/bt-gateway/gateway.yaml
RUN sed -i 's/^listen: {host: 127.0.0.1,/listen: {host: 0.0.0.0,/; s/^admin: {host: 127.0.0.1,/admin: {host: 0.0.0.0,/' \
        /etc/bt-gateway/gateway.yaml \
    && grep -q '^admin: {host: 0.0.0.0, port: 9901}' /etc/bt-gateway/gateway.yaml
ENV BT_GATEWAY_CONFIG=/etc/bt-gateway/gateway.yaml \
    PYTHONUNBUFFERED=1
USER bt-gateway
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["bt-gateway"]
CMD ["serve"]
