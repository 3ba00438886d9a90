#!/usr/bin/env bash
# Runs the whole system on this machine: builds it, uses the Redis at
# REDIS_URL (default redis://127.0.0.1:6379) or, when none answers there,
# starts a private redis-server for this session, starts the three services,
# and shows what to curl. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export RUST_LOG="${RUST_LOG:-info}"
pids=()
redis_pid=""
workdir=""

cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  # The services first, so they finish and acknowledge their work while
  # Redis is still there; then our private Redis, if we started one.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$redis_pid" ]; then
    kill -TERM "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  if [ -n "$workdir" ]; then rm -rf "$workdir"; fi
  echo "stopped"
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

need_redis_server() {
  command -v redis-server >/dev/null 2>&1 && return 0
  echo "redis-server is not installed: installing it (apt-get install -y redis-server)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
}

redis_answers() {
  # PING over bash's /dev/tcp: works without redis-cli, for redis:// URLs.
  local hostport="${1#redis://}"
  hostport="${hostport##*@}"
  hostport="${hostport%%/*}"
  local host="${hostport%:*}" port="${hostport##*:}"
  [ "$host" = "$hostport" ] && port=6379
  timeout 2 bash -c "exec 3<>/dev/tcp/$host/$port && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG" 2>/dev/null
}

echo "building (release)..."
cargo build --release --bins --quiet

if [[ "$REDIS_URL" == redis://* ]] && redis_answers "$REDIS_URL"; then
  echo "using the Redis at $REDIS_URL"
elif [[ "$REDIS_URL" == rediss://* ]]; then
  echo "using the TLS Redis at $REDIS_URL (not checked here)"
else
  need_redis_server
  workdir="$(mktemp -d)"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 16379)
  setsid redis-server --port "$port" --bind 127.0.0.1 --dir "$workdir" --save "" --appendonly yes \
    --logfile "$workdir/redis.log" &
  redis_pid=$!
  REDIS_URL="redis://127.0.0.1:$port"
  for _ in $(seq 100); do redis_answers "$REDIS_URL" && break; sleep 0.05; done
  echo "no Redis answered; started a private redis-server at $REDIS_URL (data in $workdir, removed on exit)"
fi
export REDIS_URL

# Each child in its own session: Ctrl-C reaches only this script, which
# then sends each child one SIGTERM (a second signal would make a service
# exit at once instead of finishing its work).
for svc in order-service payment-service notification-service; do
  setsid ./target/release/$svc &
  pids+=($!)
done

for _ in $(seq 200); do
  curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1 && break
  sleep 0.05
done

cat <<MSG

The system is running (Ctrl-C stops it):
  order-service        http://127.0.0.1:8080
  payment-service      http://127.0.0.1:8081/metrics
  notification-service http://127.0.0.1:8082/metrics

Try:
  curl 'http://127.0.0.1:8080/order?userId=u1&productId=p1&price=100'
  curl -X POST http://127.0.0.1:8080/orders -H 'Content-Type: application/json' \\
       -d '{"userId":"u2","productId":"p2","price":"12.50"}'
  redis-cli -u $REDIS_URL XRANGE payment-events - +
  cargo run --quiet --bin streamctl -- --redis-url $REDIS_URL status

MSG
wait -n "${pids[@]}" || true
echo "a service exited; stopping the rest"
