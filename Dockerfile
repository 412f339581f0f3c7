# Sluice server image.
#
#   DOCKER_BUILDKIT=1 docker build -t sluice .        # BuildKit: RUN --mount cache mounts
#   docker run --rm -p 50051:50051 -p 8080:8080 -v sluice-data:/var/lib/sluice sluice
#
# Build stage: the release binary, built by scripts/build-release with the cargo registry
# and the target directory on BuildKit cache mounts (a rebuild after a source change
# recompiles only what changed). Needs BuildKit, the default builder of Docker 23+ and of
# Docker Compose v2; with docker-compose 1.x set DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1.
# The Dockerfile frontend built into BuildKit understands RUN --mount, so no `# syntax=`
# line (which would pull docker/dockerfile from a registry) is needed.

# Cargo.toml says rust-version = "1.94"; any newer toolchain builds it.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The target directory lives on a cache mount, which is not part of the image: the
# binary is copied out of it in the same RUN.
ENV CARGO_TARGET_DIR=/cache/target
RUN --mount=type=cache,id=sluice-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=sluice-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=sluice-target,target=/cache/target,sharing=locked \
    bin="$(scripts/build-release)" \
    && install -D -m 0755 "$bin" /out/sluice \
    && /out/sluice --version

# Runtime: Debian slim with CA certificates (TLS to PostgreSQL, ClickHouse and S3 uses the
# system's roots) and nothing else. Migrations are compiled into the binary
# (include_str! in server/sinks/src/*/migrate.rs): nothing to copy for `sluice migrate`.
FROM ${RUNTIME_IMAGE}
# ca-certificates unpinned on purpose: it should be the current one of the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sluice \
        --no-create-home --shell /usr/sbin/nologin sluice \
    && install -d -o sluice -g sluice -m 0750 /var/lib/sluice \
    && install -d -m 0755 /etc/sluice \
    && printf '%s\n' \
        '# Container defaults; every key can be overridden by env SLUICE__SECTION__KEY, and' \
        '# sluice.example.toml in the repository lists all of them. Mount your own file here' \
        '# to replace this one (keep the listeners on 0.0.0.0 inside a container).' \
        '[server]' \
        'grpc_addr = "0.0.0.0:50051"' \
        'http_addr = "0.0.0.0:8080"' \
        'data_dir = "/var/lib/sluice"' \
        > /etc/sluice/sluice.toml

COPY --from=build /out/sluice /usr/local/bin/sluice

USER 10001:10001
WORKDIR /var/lib/sluice
# WAL, embedded registry and the default local Parquet archive. Mount a volume here.
# (Not declared VOLUME, so that no anonymous volume is created when none is mounted.)

# Arrow Flight, Flight SQL and OTLP/gRPC; REST, SQL, OTLP/HTTP, /healthz, /metrics.
EXPOSE 50051 8080

# `sluice healthcheck` GETs http://127.0.0.1:8080/healthz (--url to change it): exit 0 on
# HTTP 200, 1 otherwise. A server with another http_addr needs its own HEALTHCHECK.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sluice", "healthcheck"]

ENTRYPOINT ["sluice"]
CMD ["serve", "--config", "/etc/sluice/sluice.toml"]
