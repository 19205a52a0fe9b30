# syntax=docker/dockerfile:1
#
# wx-gateway container image.
#
#   docker build -t wx-gateway .
#   docker run --rm -p 8080:8080 \
#     -e GATEWAY_SIGNING_KEY=... -e WX_APP_SECRET=... -e WX_APPID=wx... \
#     -e REDIS_URL=redis://redis:6379/0 -e API_UPSTREAM=http://backend:9000 wx-gateway
#
# Configuration: the file named by $GATEWAY_CONFIG (default /etc/wx-gateway/config.yaml, the
# repository's commented config.yaml, driven by environment variables). Mount your own file
# there (or elsewhere and point GATEWAY_CONFIG at it); keep secrets in the environment and
# reference them from the file as ${VAR}. Arguments are passed to `wx-gateway`, so
# `docker run --rm -e ... wx-gateway --check` validates the configuration and exits.

# --- build: install the gateway and its dependencies into a virtual environment -----------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, exactly as locked (versions and hashes; see docs/development.md
# to regenerate the file): the same set on every build, and a layer that a change to
# the gateway's source does not invalidate.
COPY requirements.lock ./
# Every dependency ships binary wheels for Linux (x86-64 and arm64), so no compiler is needed
# here either (--only-binary makes that a rule: no source distribution runs code at build
# time); pip builds only the gateway's own pure-Python wheel, with no dependency of its
# own to resolve. (pip compiles the bytecode now, so a read-only root filesystem costs
# nothing at start.)
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

# --- final: the interpreter, the virtual environment and the default configuration ---------
# No compiler, no pip cache, no source tree: only what the build stage installed.
FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/wx-gateway/config.yaml \
    GATEWAY_LISTEN=0.0.0.0:8080
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
COPY config.yaml /etc/wx-gateway/config.yaml
# A numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
EXPOSE 8080
# Probes the port in $GATEWAY_LISTEN (what the default configuration listens on; a mounted
# file that listens elsewhere should use `listen: "${GATEWAY_LISTEN}"` or set the variable).
# Exit 0 when /healthz answers 200, 1 otherwise; proxy variables are deliberately ignored.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as u\nport = os.environ.get('GATEWAY_LISTEN', ':8080').rpartition(':')[2] or '8080'\ntry:\n    r = u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/healthz', timeout=2)\n    sys.exit(0 if r.status == 200 else 1)\nexcept Exception:\n    sys.exit(1)"]
# SIGTERM (docker stop) drains in-flight requests within shutdown_grace and exits 0; give
# `docker stop -t` / stop_grace_period more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["wx-gateway"]
# No default arguments: the configuration comes from $GATEWAY_CONFIG. (ENTRYPOINT resets the
# base image's CMD.)
CMD []
