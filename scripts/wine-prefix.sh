#!/usr/bin/env bash
# Prepares a headless Wine prefix that runs fleetpatch-agent.exe as a Windows
# service (Debian bookworm's Wine 8.0), and keeps a wineserver running for it.
#
# Usage: scripts/wine-prefix.sh [prepare|stop] [--no-install]
#   prepare (default)  install wine/wine64/msitools/wixl/mingw if missing, create the prefix
#                      once (~10 s, ~700 MB), install the bcryptprimitives.dll stand-in,
#                      start a persistent wineserver; a second run takes about a second
#   stop               stop the prefix's wineserver (and every Wine process of it)
#
# Environment:
#   FLEETPATCH_WINEPREFIX  the prefix (default ~/.cache/fleetpatch-wine/prefix); cache it between CI runs
#
# Prints the prefix path on the last line of stdout, so a caller can do:
#   export WINEPREFIX="$(scripts/wine-prefix.sh | tail -n1)"
#
# Why each step (see also the project's notes on Wine as a Windows peer):
# * WINEDEBUG=-all and no DISPLAY: no X server, no debug noise.
# * bcryptprimitives.dll: Rust's std (>= 1.78) imports ProcessPrng from it and
#   Wine 8.0 has no such DLL, so every Rust .exe exits 53 before main. The
#   stand-in (scripts/windows/bcryptprimitives.c) forwards to BCryptGenRandom.
# * `wineserver -p`: without a persistent server Wine ends services.exe, and
#   every service with it, ~2 s after the last ordinary Wine process exits.
set -euo pipefail
cd "$(dirname "$0")/.."

command=prepare
install=yes
for argument in "$@"; do
  case "$argument" in
    --no-install) install=no ;;
    *) command="$argument" ;;
  esac
done
export WINEPREFIX="${FLEETPATCH_WINEPREFIX:-${HOME}/.cache/fleetpatch-wine/prefix}"
export WINEDEBUG=-all
export WINEDLLOVERRIDES="${WINEDLLOVERRIDES:-mscoree,mshtml=}"
unset DISPLAY WAYLAND_DISPLAY

say() { printf 'wine-prefix: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

case "$command" in
  stop)
    wineserver -k 2>/dev/null || true
    say "wineserver stopped for $WINEPREFIX"
    exit 0
    ;;
  prepare) ;;
  *) die "unknown command $command (prepare or stop)" ;;
esac

if [ "$install" = yes ]; then
  missing=()
  for package in wine wine64 msitools wixl gcc-mingw-w64-x86-64; do
    dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
      apt-get update -qq
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
command -v wine >/dev/null || die "wine is not installed (apt-get install wine wine64)"

started=$SECONDS
source_dll=scripts/windows/bcryptprimitives.c
stamp="$WINEPREFIX/.fleetpatch-prefix"
want="$(wine --version) $(sha256sum "$source_dll" | cut -c1-64)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "prefix $WINEPREFIX is ready ($want)"
else
  if [ ! -f "$WINEPREFIX/system.reg" ]; then
    say "creating the prefix $WINEPREFIX"
    mkdir -p "$WINEPREFIX"
    wineboot -i >/dev/null 2>&1 || die "wineboot -i failed for $WINEPREFIX"
  fi
  # Make sure prefix creation is complete before files are added to it.
  wineserver -w
  system32="$WINEPREFIX/drive_c/windows/system32"
  [ -d "$system32" ] || die "the prefix has no $system32"
  build="$(mktemp -d)"
  x86_64-w64-mingw32-gcc -O2 -s -shared -o "$build/bcryptprimitives.dll" "$source_dll" -lbcrypt
  install -m 644 "$build/bcryptprimitives.dll" "$system32/bcryptprimitives.dll"
  rm -rf "$build"
  echo "$want" >"$stamp"
  say "prefix ready in $((SECONDS - started))s ($(du -sh "$WINEPREFIX" | cut -f1))"
fi

# One persistent wineserver for the prefix; `-p` exits 2 if one is already up.
if wineserver -p 2>/dev/null; then
  say "persistent wineserver started"
else
  say "wineserver already running"
fi
# services.exe (and the rest of the prefix's boot) up before the caller starts services.
wine cmd /d /c exit 0 >/dev/null 2>&1 || die "wine cannot run cmd.exe in $WINEPREFIX"
echo "$WINEPREFIX"
