# syntax=docker/dockerfile:1
# The fleetpatch image: `fleetpatch` (scheduler, worker, collector, migrate and
# the client), the Linux agent and the Windows agent that workers copy to the
# targets. The Helm chart (deploy/helm/fleetpatch) and docker-compose.yml run it:
#
#   docker build -t ghcr.io/fleetpatch/fleetpatch:0.1.0 .
#
# Built for linux/amd64 (the agents are x86_64 executables). No Docker daemon
# runs on the project's machines: services/cli/tests/dockerfile.rs lints this
# file with hadolint and checks every path it copies.

# fleetpatch and the Linux agent, with the workspace's rust-version. The agent
# is linked statically (glibc, static-pie: services/agent/README.md, "Static
# build") so that it runs on targets whatever their C library's version.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked -p fleetpatch \
    && RUSTFLAGS='-C target-feature=+crt-static' \
       cargo build --release --locked -p fleetpatch-agent --bin fleetpatch-agent --target x86_64-unknown-linux-gnu

# The Windows agent, cross-built as on the developers' machines and in CI:
# Debian's rustc-web, cargo-web and rust-web-src (-Zbuild-std) and mingw-w64,
# by scripts/build-windows-agent.sh, which checks the three match.
FROM debian:bookworm-slim AS windows-agent
# Debian's own versions of the security suite; pinning them would break the
# build at their next update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV FLEETPATCH_WINDOWS_TARGET_DIR=/src/target-windows
RUN scripts/build-windows-agent.sh --no-install

# The runtime: a slim Debian of the build stage's release (glibc), a non-root
# user (10001, the Helm chart's runAsUser), the agents where the chart and
# deploy/docker/fleetpatch.toml (worker.agent_binaries) expect them.
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 fleetpatch \
    && useradd --system --uid 10001 --gid fleetpatch --home-dir /var/lib/fleetpatch --no-create-home \
       --shell /usr/sbin/nologin fleetpatch \
    && mkdir -p /var/lib/fleetpatch/content /var/lib/fleetpatch/admin \
    && chown -R fleetpatch:fleetpatch /var/lib/fleetpatch
COPY --from=build /src/target/release/fleetpatch /usr/local/bin/fleetpatch
COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/fleetpatch-agent \
     /usr/local/lib/fleetpatch/agents/fleetpatch-agent-x86_64
COPY --from=windows-agent /src/target-windows/x86_64-pc-windows-gnu/release/fleetpatch-agent.exe \
     /usr/local/lib/fleetpatch/agents/fleetpatch-agent-windows-x86_64.exe
COPY deploy/docker/fleetpatch.toml /etc/fleetpatch/fleetpatch.toml
COPY --chmod=755 deploy/docker/entrypoint.sh /usr/local/bin/fleetpatch-entrypoint
ENV FLEETPATCH_CONFIG=/etc/fleetpatch/fleetpatch.toml
USER 10001:10001
WORKDIR /var/lib/fleetpatch
# API and console, agents' reports, a worker's ops endpoints (/livez, /readyz, /metrics).
EXPOSE 8080 1072 9102
ENTRYPOINT ["/usr/local/bin/fleetpatch-entrypoint", "fleetpatch"]
CMD ["--help"]
