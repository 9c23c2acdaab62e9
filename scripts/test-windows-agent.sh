#!/usr/bin/env bash
# Runs fleetpatch-agent's unit tests as Windows programs under Wine: cross-
# compiled for x86_64-pc-windows-gnu with the toolchain of
# build-windows-agent.sh, each test binary started by `wine` as cargo's runner.
#
# Usage: scripts/test-windows-agent.sh [--no-install] [-- TEST-ARGS...]
# Environment: FLEETPATCH_WINDOWS_TARGET_DIR and FLEETPATCH_WINEPREFIX, as the
# two scripts it calls (the same caches).
#
# The end-to-end tests of services/agent/tests/ run /bin/sh installers, so
# they are Unix-only; the Windows service test is tests/tests/windows_service.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

install=()
if [ "${1:-}" = "--no-install" ]; then
  install=(--no-install)
  shift
fi
[ "${1:-}" = "--" ] && shift

WINEPREFIX="$(scripts/wine-prefix.sh prepare "${install[@]}" | tail -n1)"
export WINEPREFIX WINEDEBUG=-all
unset DISPLAY WAYLAND_DISPLAY

# The toolchain set-up of build-windows-agent.sh (it also checks the packages).
scripts/build-windows-agent.sh --check-only "${install[@]}" >/dev/null
export CARGO_TARGET_DIR="${FLEETPATCH_WINDOWS_TARGET_DIR:-${HOME}/.cache/fleetpatch-windows-target}"
export RUSTC=/usr/bin/rustc CARGO=/usr/bin/cargo PATH="/usr/bin:/bin:/usr/sbin:/sbin" RUSTC_BOOTSTRAP=1
unset RUSTUP_TOOLCHAIN RUSTFLAGS
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine
# Tests in a test binary run on threads; Wine copes, but one at a time keeps
# the process-tree tests' timings honest on a busy machine.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"

started=$SECONDS
"$CARGO" test --locked -p fleetpatch-agent --lib --target x86_64-pc-windows-gnu \
  -Zbuild-std=std,panic_abort,test -- "$@"
printf 'test-windows-agent: done in %ss\n' "$((SECONDS - started))" >&2
