#!/bin/sh
# Makes the secrets docker-compose.yml reads (its top-level `secrets:`), once:
# a file that exists is kept, so running it again changes nothing.
#
#   deploy/compose/make-secrets.sh [DIR]     (default: deploy/compose/secrets)
#
#   postgres-password        PostgreSQL's password for the user fleetpatch
#   database-url             postgres://fleetpatch:<that password>@postgres:5432/fleetpatch
#   rabbitmq.conf            RabbitMQ's default_user fleetpatch and its password
#   amqp-url                 amqp://fleetpatch:<that password>@rabbitmq:5672/%2f
#   token-key                the key agent tokens derive from (workers and collector)
#   grafana-admin-password   Grafana's password for the user admin
#
# The directory is private (0700); the files in it are 0644, because each
# container reads its secret as its own user (postgres, rabbitmq, 10001...)
# through a bind mount that keeps the file's owner and mode.
set -eu
dir="${1:-$(dirname "$0")/secrets}"
umask 077
mkdir -p "$dir"
chmod 700 "$dir"

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

# write NAME VALUE: NAME gets VALUE unless it exists already.
write() {
  if [ ! -e "$dir/$1" ]; then
    printf '%s\n' "$2" > "$dir/$1.new"
    chmod 644 "$dir/$1.new"
    mv "$dir/$1.new" "$dir/$1"
    echo "made $dir/$1"
  fi
}

write postgres-password "$(random_hex 24)"
postgres_password="$(cat "$dir/postgres-password")"
write database-url "postgres://fleetpatch:${postgres_password}@postgres:5432/fleetpatch"

if [ ! -e "$dir/rabbitmq.conf" ]; then
  write rabbitmq.conf "default_user = fleetpatch
default_pass = $(random_hex 24)"
fi
rabbitmq_password="$(sed -n 's/^default_pass = //p' "$dir/rabbitmq.conf")"
write amqp-url "amqp://fleetpatch:${rabbitmq_password}@rabbitmq:5672/%2f"

write token-key "$(random_hex 32)"
write grafana-admin-password "$(random_hex 16)"
echo "secrets in $dir"
