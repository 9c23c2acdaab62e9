#!/bin/sh
# The image's entry point: runs its arguments (`fleetpatch scheduler`, ...)
# after reading settings from files, for Docker and Compose secrets:
#
#   FLEETPATCH_FILE__DATABASE__URL=/run/secrets/database-url
#
# sets FLEETPATCH__DATABASE__URL to the content of that file (without its
# trailing newlines) and removes FLEETPATCH_FILE__DATABASE__URL. Any
# FLEETPATCH__SECTION__KEY can be given so; a key the binary does not know is
# refused by name as usual. An unreadable file stops the container here.
set -eu
for name in $(env | sed -n 's/^FLEETPATCH_FILE__\([A-Za-z0-9_]*\)=.*/\1/p'); do
  file="$(printenv "FLEETPATCH_FILE__${name}")"
  if ! value="$(cat -- "$file")"; then
    echo "fleetpatch-entrypoint: FLEETPATCH_FILE__${name}: cannot read ${file}" >&2
    exit 78
  fi
  export "FLEETPATCH__${name}=${value}"
  unset "FLEETPATCH_FILE__${name}"
done
exec "$@"
