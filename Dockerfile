# fhir-sidecar container image.
#   docker build -t fhir-sidecar:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=https://git.example.org/you/fhir-sidecar .
#   docker run --read-only -v "$PWD/config:/etc/fhir-sidecar/config:ro" -p 8081:8081 fhir-sidecar:0.1.0
# Python 3.13 because mitmproxy 12.x needs >= 3.12. Both stages use the same base image so the
# virtual environment's interpreter path exists in the final stage: the venv is made by
# `python -m venv`, so it points at wherever the base keeps `python` (/usr/local/bin in
# python:3.13-slim, /usr/bin in the Debian base CI builds this file on: .ci/image-check).

# ---- build: install the pinned dependencies and the package into a venv ----
FROM python:3.13-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/fhir-sidecar
WORKDIR /src

# Dependencies first, in their own layer: code changes do not reinstall them. --no-deps makes the
# lock the whole truth; --require-hashes refuses any file whose sha256 the lock does not list;
# --only-binary keeps compilers out of the picture (every pin has a wheel).
COPY requirements.lock ./
RUN /opt/fhir-sidecar/bin/pip install --require-hashes --no-deps --only-binary=:all: \
      -r requirements.lock

COPY pyproject.toml README.md LICENSE ./
COPY sidecar ./sidecar
# `pip check` fails the build if the lock no longer covers pyproject.toml's dependencies.
RUN /opt/fhir-sidecar/bin/pip install --no-deps . \
 && /opt/fhir-sidecar/bin/pip check

# ---- runtime: the venv on a slim base; no compilers, no build files ----
FROM python:3.13-slim

# Set at build time: --build-arg REVISION="$(git rev-parse HEAD)" --build-arg SOURCE=<repo URL>.
# VERSION stays equal to pyproject.toml's version (tests/test_packaging.py checks).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="fhir-sidecar" \
      org.opencontainers.image.description="Injects FHIR credentials and per-connection TLS into plain HTTP calls" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric non-root user: Kubernetes can only verify runAsNonRoot against a numeric USER.
RUN groupadd --system --gid 10001 fhir-sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/fhir-sidecar \
      --shell /usr/sbin/nologin fhir-sidecar \
 && mkdir -p /var/lib/fhir-sidecar /etc/fhir-sidecar/config \
 && chown 10001:10001 /var/lib/fhir-sidecar

COPY --from=build /opt/fhir-sidecar /opt/fhir-sidecar

# State (mitmproxy's CA store and the like) goes to /var/lib/fhir-sidecar, the one writable place,
# so the root filesystem can be read-only. Nothing writes .pyc files at run time.
ENV PATH=/opt/fhir-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/fhir-sidecar \
    FHIR_SIDECAR_STATE_DIR=/var/lib/fhir-sidecar \
    FHIR_SIDECAR_CONFIG=/etc/fhir-sidecar/config/config.yaml \
    FHIR_SIDECAR_HEALTH_URL=http://127.0.0.1:9901/healthz

# With `docker run --read-only` this still gets a writable (anonymous) volume.
VOLUME ["/var/lib/fhir-sidecar"]

USER 10001:10001
WORKDIR /var/lib/fhir-sidecar

# Forward proxy (config proxy.listen) and admin listener, by the documented defaults.
EXPOSE 8080 9901

# slim has no curl: ask /healthz with the standard library. Loopback works whether admin.listen is
# 127.0.0.1 or 0.0.0.0; set FHIR_SIDECAR_HEALTH_URL if the admin port differs. (Kubernetes ignores
# HEALTHCHECK and uses the chart's probes.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['FHIR_SIDECAR_HEALTH_URL'], timeout=4)"]

# SIGTERM drains in-flight requests; the exec form makes the sidecar PID 1 so it receives it.
ENTRYPOINT ["fhir-sidecar"]
CMD ["run"]
