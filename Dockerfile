# idempotency-proxy container image.
#
#   docker build -t idempotency-proxy:0.1.0 .
#   docker run -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -v "$PWD/deploy/config/proxy.yaml:/etc/idempotency-proxy/config.yaml:ro" \
#     -e IDEMPOTENCY_PROXY_ADMIN_TOKEN=... idempotency-proxy:0.1.0
#
# The image ships no configuration: mount yours at /etc/idempotency-proxy/config.yaml.
# Environment overrides: IDEMPOTENCY_PROXY_STORE_URL, IDEMPOTENCY_PROXY_LISTEN,
# IDEMPOTENCY_PROXY_ADMIN_LISTEN, IDEMPOTENCY_PROXY_ADMIN_TOKEN, IDEMPOTENCY_PROXY_LOG_LEVEL.

# Build stage: the wheels and the build backend stay here, only the virtualenv ships.
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="idempotency-proxy" \
      org.opencontainers.image.description="Reverse proxy that makes retries safe for legacy HTTP APIs (Idempotency-Key)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      idempotency-proxy.config="/etc/idempotency-proxy/config.yaml" \
      idempotency-proxy.ports="8080 proxy, 9090 admin (/healthz /readyz /metrics)"

# Debian's base image already has a user called "proxy" (uid 13): use our own, fixed uid so
# that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 idproxy \
    && useradd --system --no-log-init --uid 10001 --gid idproxy \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin idproxy \
    && mkdir -p /etc/idempotency-proxy

COPY --from=build /opt/venv /opt/venv

# The admin listener defaults to loopback; in a container the probes and Prometheus come from
# outside, so listen on every interface. The admin API then needs IDEMPOTENCY_PROXY_ADMIN_TOKEN;
# /healthz, /readyz and /metrics stay open.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IDEMPOTENCY_PROXY_ADMIN_LISTEN=0.0.0.0:9090

USER 10001:10001
EXPOSE 8080 9090

# The slim image has no curl: probe with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["idempotency-proxy"]
CMD ["run", "--config", "/etc/idempotency-proxy/config.yaml"]
