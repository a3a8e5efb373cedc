# bt-gateway: slim runtime image, non-root, config at /etc/bt-gateway/gateway.yaml.
# Build stage: compile wheels (uvloop, brotli, zstandard may need a compiler on some platforms).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: no compiler, no pip cache, no source tree.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home bt-gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/gateway.yaml /etc/bt-gateway/gateway.yaml
ENV BT_GATEWAY_CONFIG=/etc/bt-gateway/gateway.yaml \
    BT_GATEWAY_LISTEN_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
USER bt-gateway
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["bt-gateway"]
CMD ["serve"]
