# syntax=docker/dockerfile:1
#
# aep-s3-rotator container image.
#
#   docker build -t aep-s3-rotator .
#   docker run --rm \
#     -v /path/to/config.toml:/etc/aep-s3-rotator/config.toml:ro \
#     -v /path/to/adobe-client-secret:/run/secrets/adobe-client-secret:ro \
#     -e AWS_REGION=us-east-1 -p 9464:9464 aep-s3-rotator
#
# Configuration comes from the mounted file and AEP_S3_ROTATOR__SECTION__KEY
# environment overrides. In a container set [admin] listen = "0.0.0.0:9464"
# (the default 127.0.0.1 is unreachable from outside the container) and
# [state] path = "/var/lib/aep-s3-rotator/state.json" on a mounted volume.
#
# Not built in CI (no container engine there); scripts/smoke-container builds
# and runs it for real with podman. Keep the stages in step with Cargo.toml by
# hand.
#
# Where pulling is impossible (an air-gapped host), two build arguments swap
# the pulled images for local ones, as scripts/smoke-container does:
#
#   RUNTIME_IMAGE=localhost/aep-s3-rotator-runtime:bookworm   a base made with
#       mmdebstrap (Debian 12: libc, libgcc, CA certificates, user 65532, no shell)
#   BINARY=prebuilt   take target/docker/aep-s3-rotator, built on a Debian 12
#       host with `cargo build --release --locked --no-default-features`,
#       instead of compiling in the rust image (which is then never pulled)
#
# The image is the production build: `--no-default-features` leaves out the
# `demo` command and with it the simulator crate (crates/aep-s3-simulator),
# a test peer that has no place in a deployed binary.

# Same Debian release as the runtime image below, so the glibc the binary is
# linked against is the one it runs with.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# Which stage provides /out: `builder` (compile here) or `prebuilt`.
ARG BINARY=builder

FROM ${RUST_IMAGE} AS builder
WORKDIR /build

# Dependencies first, in their own layer: it is rebuilt only when a manifest
# or Cargo.lock change, not on every source edit (the AWS SDK takes minutes).
# Placeholders stand in for the crates' sources (and for any target whose path
# Cargo.toml names explicitly, which cargo insists on finding); afterwards the
# placeholder crate's artifacts are deleted so that the real one is always
# rebuilt, whatever the mtimes of the copied sources. Every workspace member's
# manifest must be present for cargo to load the workspace, even the
# simulator's, which this build never compiles.
COPY Cargo.toml Cargo.lock ./
COPY crates/aep-s3-simulator/Cargo.toml crates/aep-s3-simulator/
RUN set -eu; \
    mkdir -p src crates/aep-s3-simulator/src; \
    echo 'fn main() {}' > src/main.rs; \
    echo '//! Placeholder to build dependencies.' > src/lib.rs; \
    echo '//! Placeholder: a workspace member, not built here.' > crates/aep-s3-simulator/src/lib.rs; \
    for path in $(sed -n 's/^path *= *"\(.*\.rs\)".*/\1/p' Cargo.toml); do \
        if [ ! -e "$path" ]; then \
            mkdir -p "$(dirname "$path")"; echo 'fn main() {}' > "$path"; echo "$path" >> /tmp/placeholders; \
        fi; \
    done; \
    cargo build --release --locked --no-default-features --bin aep-s3-rotator; \
    if [ -f /tmp/placeholders ]; then xargs rm -f < /tmp/placeholders; fi; \
    rm -rf src crates/aep-s3-simulator/src \
        target/release/aep-s3-rotator \
        target/release/aep-s3-rotator.d \
        target/release/deps/aep_s3_rotator-* \
        target/release/deps/libaep_s3_rotator-* \
        target/release/.fingerprint/aep-s3-rotator-*

# Everything the build may read (sources, include_str! targets, crates/);
# .dockerignore keeps target/, .git and the packaging files out.
COPY . .
# Only the daemon, without `demo` (see the top). The empty state directory,
# owned by the runtime user below, serves when no volume is mounted there (the
# state then dies with the container).
RUN cargo build --release --locked --no-default-features --bin aep-s3-rotator \
    && install -D -m 0755 target/release/aep-s3-rotator /out/usr/local/bin/aep-s3-rotator \
    && install -d -m 0700 /out/var/lib/aep-s3-rotator \
    && install -d -m 0700 /out/run/aep-s3-rotator

# A binary built outside (BINARY=prebuilt), laid out as the builder's /out.
# .dockerignore lets this one file of target/ into the context. WORKDIR makes
# the empty state and socket directories without a shell; buildah creates a
# WORKDIR only when a later step writes to the stage, so each is followed by
# a COPY (the same file twice: the second lands where the first did).
FROM scratch AS prebuilt
WORKDIR /out/run/aep-s3-rotator
COPY target/docker/aep-s3-rotator /out/usr/local/bin/aep-s3-rotator
WORKDIR /out/var/lib/aep-s3-rotator
COPY target/docker/aep-s3-rotator /out/usr/local/bin/aep-s3-rotator

# The stage named by BINARY; the other one is never built (nor its base pulled).
FROM ${BINARY} AS binary

# Runtime: glibc, libgcc, CA certificates and tzdata; no shell, no package
# manager. ":nonroot" runs as uid/gid 65532. The daemon reads the image's CA
# store at start (`check` prints it as its `ca` line); on a base without one
# it falls back to the Mozilla roots built into the binary, with a warning.
FROM ${RUNTIME_IMAGE}

LABEL org.opencontainers.image.title="aep-s3-rotator" \
      org.opencontainers.image.description="Keeps Adobe Experience Platform S3 base connections supplied with fresh, temporary AWS credentials" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=binary /out/usr/local/bin/aep-s3-rotator /usr/local/bin/aep-s3-rotator
COPY --from=binary --chown=65532:65532 /out/var/lib/aep-s3-rotator /var/lib/aep-s3-rotator
# The control socket's directory (/run/aep-s3-rotator/control.sock, the
# default): `kubectl exec POD -- aep-s3-rotator rotate --all` runs as this
# user and finds it there, with no shell. Mount an emptyDir here when the
# root filesystem is read-only.
COPY --from=binary --chown=65532:65532 /out/run/aep-s3-rotator /run/aep-s3-rotator

USER nonroot

# Logs: one JSON object per line on stderr. Config: mount it here (or set
# AEP_S3_ROTATOR_CONFIG / pass --config).
ENV AEP_S3_ROTATOR_LOG_FORMAT=json \
    AEP_S3_ROTATOR_CONFIG=/etc/aep-s3-rotator/config.toml

# Admin endpoint: /healthz, /readyz, /metrics, /status.
EXPOSE 9464

# No HEALTHCHECK: the image has no shell or curl to run one. Use the HTTP
# probes instead (Kubernetes livenessProbe /healthz, readinessProbe /readyz;
# see deploy/kubernetes/sidecar.yaml).

# The daemon is PID 1: it handles SIGTERM/SIGINT itself (drain in-flight
# PATCHes for up to 10 s, write state, exit 0) and spawns no children to reap.
ENTRYPOINT ["/usr/local/bin/aep-s3-rotator"]
CMD ["run"]
