# syntax=docker/dockerfile:1
#
# streamproc container image.
#
#   docker build -t streamproc:local .
#   docker run --rm --read-only --tmpfs /tmp \
#     -v "$PWD/streamproc.yaml:/etc/streamproc/streamproc.yaml:ro" ... streamproc:local
#
# Three stages: `native` builds the wheel, compiled plan interpreter included (Rust crate
# native/, the abi3 extension streamproc._native); the builder installs that wheel, with
# its dependencies and the vault/aws/registry extras, into a virtualenv at /opt/venv; the
# runtime stage is a clean python:3.11-slim with only that virtualenv copied in (no
# compiler, no Rust, no pip cache, no source tree).  STREAMPROC_NATIVE=0 at run time
# switches to the generated Python plan functions (docs/deploy.md).
#
# The runtime runs as the numeric, non-root user 10001 and writes nothing outside the
# mounts the deployment gives it, so it works with a read-only root filesystem:
#   /tmp                      tmpfs (compose) / emptyDir (Kubernetes).  With --workers N
#                             the supervisor creates its Prometheus multiprocess directory
#                             here (server.setup_multiprocess -> tempfile.mkdtemp), so
#                             PROMETHEUS_MULTIPROC_DIR is deliberately not set: setting it
#                             would also switch a single worker to multiprocess values.
#   /var/run/streamproc/keys  the local keyring (a volume), only with kms.provider local
#   /etc/streamproc           configuration and policy, mounted read-only
# No secret is baked in: KMS tokens come from the environment (VAULT_TOKEN, AWS_*) and
# key material from a mounted volume (docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Pinned to the release the crate is built and tested with; slim-bookworm has gcc (the
# linker) and the same glibc as the Python image, which runs what it links.
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS native

# Bookworm's own Python is 3.11, the version the abi3 extension targets (pyo3 feature
# abi3-py311): it only drives setup.py, the wheel runs on the Python image's 3.11.  Not
# pinned to a Debian revision (DL3008): security updates replace revisions on the mirror,
# so a pin would break the build; every bookworm revision is 3.11, and the wheel check
# below holds the result.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    CARGO_TARGET_DIR=/tmp/cargo-target

RUN python3 -m venv /opt/build
ENV PATH=/opt/build/bin:$PATH

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps everything else out of the
# context, native/target included). README.md* is a glob so a checkout without a README
# still builds.
COPY pyproject.toml setup.py README.md* ./
COPY native/Cargo.toml native/Cargo.lock ./native/
COPY native/src/ ./native/src/
COPY streamproc/ ./streamproc/

# The crates exactly as Cargo.lock says (--locked fails on a lock file that does not match
# Cargo.toml), then the wheel built offline from them, so the build cannot resolve
# anything else.  --py-limited-api=cp311 makes the wheel cp311-abi3 with _native.abi3.so.
# setup.py marks the extension optional (a checkout without Rust still installs), so the
# wheel is checked here: abi3-tagged and holding the extension, or the build fails.
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=cache,target=/usr/local/cargo/registry \
    cargo fetch --locked --manifest-path native/Cargo.toml \
 && CARGO_NET_OFFLINE=true pip wheel --no-deps --wheel-dir /dist \
        --config-settings=--build-option=--py-limited-api=cp311 . \
 && python3 -c "import glob, sys, zipfile; (w,) = glob.glob('/dist/streamproc-*-cp311-abi3-linux_*.whl'); names = zipfile.ZipFile(w).namelist(); sys.exit(0 if 'streamproc/_native.abi3.so' in names else w + ': no streamproc/_native.abi3.so')"

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY --from=native /dist/ /dist/

# The wheel and its dependencies into the venv; compile bytecode now, because the
# runtime's root filesystem is read-only.  Then the extension must import here, on the
# runtime's interpreter, and the plan code must see it: otherwise the image would
# silently run the slower Python path.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --compile "$(ls /dist/streamproc-*.whl)[vault,aws,registry]" \
 && python -c "import sys, streamproc._native; from streamproc.pipeline import native; sys.exit(0 if native.available() else 'streamproc._native imports but the plan code does not see it')" \
 && streamproc --version

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown

LABEL org.opencontainers.image.title="streamproc" \
      org.opencontainers.image.description="Streaming privacy processor for Kafka: envelope decryption, policy-driven pseudonymization, per-audience re-encryption." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/streamproc/streamproc" \
      org.opencontainers.image.documentation="https://github.com/streamproc/streamproc/blob/main/docs/deploy.md" \
      org.opencontainers.image.base.name="python:3.11-slim-bookworm"

# A system user with a fixed numeric id (Kubernetes runAsUser, compose user:), no home and
# no shell; the directories the deployment mounts over, owned by it (a named volume mounted
# on the keys directory starts with this ownership).
RUN groupadd --system --gid 10001 streamproc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin streamproc \
 && install -d -o 10001 -g 10001 -m 0700 /var/run/streamproc/keys \
 && install -d -o root -g root -m 0755 /etc/streamproc

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    STREAMPROC_KEYRING=/var/run/streamproc/keys/keyring.json

USER 10001:10001
WORKDIR /etc/streamproc

# /metrics, /healthz and /readyz (metrics.port in the config; STREAMPROC_METRICS_PORT).
EXPOSE 9464

# No curl in slim: the health check uses the interpreter already in the image.  urlopen
# raises on any non-2xx answer or connection error, so the exit status is the verdict.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STREAMPROC_METRICS_PORT', '9464'), timeout=4)"]

ENTRYPOINT ["streamproc"]
CMD ["run", "--config", "/etc/streamproc/streamproc.yaml"]
