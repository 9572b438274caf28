#!/usr/bin/env bash
# Make sure the PostgreSQL, Redis and RabbitMQ the integration tests use are running
# on 127.0.0.1 (they usually are on the development machines; CI starts them here).
set -euo pipefail
PATH="$PATH:/usr/sbin:/sbin"  # Debian's rabbitmq-server, off a user's PATH

# a command not installed: say which Debian package brings it
need() {  # COMMAND WHAT PACKAGE
  command -v "$1" >/dev/null 2>&1 && return
  echo "$1 ($2) not found: apt-get install $3" >&2
  exit 1
}
need pg_isready "PostgreSQL's client" postgresql-client
need redis-cli "Redis's client" redis-tools

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  need pg_ctlcluster "PostgreSQL, down on 127.0.0.1" postgresql
  echo "==> starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  need redis-server "Redis, down on 127.0.0.1" redis-server
  echo "==> starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  need rabbitmq-server "RabbitMQ, down on 127.0.0.1" rabbitmq-server
  echo "==> starting RabbitMQ"
  rabbitmq-server -detached
  # (await_startup fails at once while the node is not yet known to epmd)
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break
    sleep 0.2
  done
  rabbitmqctl -q --timeout 60 await_startup
fi
for _ in $(seq 1 100); do
  pg_isready -q -h 127.0.0.1 -p 5432 && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "PostgreSQL or Redis did not come up on 127.0.0.1" >&2
exit 1
