#!/usr/bin/env bash
# Builds fleetpatch-agent.exe for x86_64-pc-windows-gnu with Debian's own Rust
# toolchain (no rustup target, nothing downloaded outside the Debian and
# crates.io registries):
#
#   rustc-web, cargo-web, rust-web-src   a Rust toolchain whose std source lets
#                                        cargo build std for the target
#                                        (-Zbuild-std, RUSTC_BOOTSTRAP=1)
#   gcc-mingw-w64-x86-64                 the linker (x86_64-w64-mingw32-gcc)
#
# Usage: scripts/build-windows-agent.sh [--no-install] [--check-only]
#   --no-install  never call apt-get (fail when a package is missing)
#   --check-only  install and check the toolchain, build nothing
#
# Environment:
#   FLEETPATCH_WINDOWS_TARGET_DIR  cargo target dir (default ~/.cache/fleetpatch-windows-target);
#                                  keep it between runs: a warm build takes seconds
#   FLEETPATCH_WINDOWS_PROFILE     cargo profile (default release)
#
# Prints the .exe path on the last line of stdout (the lines before it go to
# stderr), so a caller can do: EXE="$(scripts/build-windows-agent.sh | tail -n1)".
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=x86_64-pc-windows-gnu
PROFILE="${FLEETPATCH_WINDOWS_PROFILE:-release}"
export CARGO_TARGET_DIR="${FLEETPATCH_WINDOWS_TARGET_DIR:-${HOME}/.cache/fleetpatch-windows-target}"
PACKAGES=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64)

say() { printf 'build-windows-agent: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

installed_version() { dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null | awk '$1 == "installed" { print $2 }'; }

install=yes
check_only=no
for argument in "$@"; do
  case "$argument" in
    --no-install) install=no ;;
    --check-only) check_only=yes ;;
    *) die "unknown argument $argument (--no-install, --check-only)" ;;
  esac
done

if [ "$install" = yes ]; then
  missing=()
  for package in "${PACKAGES[@]}"; do
    [ -n "$(installed_version "$package")" ] || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Package lists are absent on a fresh image; fetch them once.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
      apt-get update -qq
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# The three Rust packages come from one source package: a rustc, a cargo and a
# std source of different releases would build a std the compiler rejects.
rustc_version="$(installed_version rustc-web)"
[ -n "$rustc_version" ] || die "rustc-web is not installed (run without --no-install, as root)"
for package in cargo-web rust-web-src; do
  version="$(installed_version "$package")"
  [ "$version" = "$rustc_version" ] \
    || die "$package is ${version:-not installed}, rustc-web is $rustc_version; install matching versions: apt-get install rustc-web cargo-web rust-web-src"
done
[ -n "$(installed_version gcc-mingw-w64-x86-64)" ] || die "gcc-mingw-w64-x86-64 is not installed"

# rustup's ~/.cargo/bin shadows /usr/bin/{rustc,cargo}: name Debian's explicitly.
export RUSTC=/usr/bin/rustc
export CARGO=/usr/bin/cargo
export PATH="/usr/bin:/bin:/usr/sbin:/sbin"
unset RUSTUP_TOOLCHAIN RUSTFLAGS
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
sysroot="$("$RUSTC" --print sysroot)"
[ -f "$sysroot/lib/rustlib/src/rust/library/Cargo.lock" ] \
  || die "no std source under $sysroot/lib/rustlib/src/rust (rust-web-src)"

say "$("$RUSTC" --version), $("$CARGO" --version), x86_64-w64-mingw32-gcc $(x86_64-w64-mingw32-gcc -dumpversion)"
[ "$check_only" = yes ] && exit 0
say "target dir $CARGO_TARGET_DIR"
started=$SECONDS
"$CARGO" build --locked --profile "$PROFILE" -p fleetpatch-agent --bin fleetpatch-agent \
  --target "$TARGET" -Zbuild-std=std,panic_abort >&2
elapsed=$((SECONDS - started))

profile_dir="$PROFILE"
[ "$PROFILE" = dev ] && profile_dir=debug
exe="$CARGO_TARGET_DIR/$TARGET/$profile_dir/fleetpatch-agent.exe"
[ -f "$exe" ] || die "cargo finished but $exe is missing"
stripped="$(mktemp)"
x86_64-w64-mingw32-strip -o "$stripped" "$exe"
say "built in ${elapsed}s: $(stat -c %s "$exe") bytes, $(stat -c %s "$stripped") bytes stripped"
rm -f "$stripped"
echo "$exe"
