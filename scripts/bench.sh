#!/usr/bin/env bash
# Benchmarks the three services on this machine, with nothing shared:
#
#   1. builds the release binaries and the load tool (benches/load.rs);
#   2. starts a PRIVATE redis-server on a free port in a temp dir (a Redis
#      already running on 6379 is never touched);
#   3. measures start-to-ready of each binary against it (load tool, mode
#      `ready`);
#   4. starts the three services on free ports (REDIS_URL, HTTP_ADDR,
#      RUST_LOG=warn) and runs `load all` against them: reference and system
#      runs interleaved for --rounds rounds;
#   5. stops everything on exit, Ctrl-C included.
#
# Usage: scripts/bench.sh [load flags]    e.g. scripts/bench.sh -n 50000 -c 32 --rounds 5
#        scripts/bench.sh --wan [load flags]
#   --wan: instead of 3-5, one table over Redis round trips of 0, 1, 10 and
#   50 ms (the load tool's own delay proxy between the services it starts
#   and Redis) and -c 64 and 256: /order against its bound c / RTT (the
#   RTT a PING measures through the proxy), end-to-end, order -> payment
#   p50 and CPU per order per process. RTTS="0 10" and CLIENTS="64" narrow it.
#        scripts/bench.sh MODE [load flags]
#   MODE: the load tool's mode run against the services in step 4, `all`
#   by default; `keyed` compares /order without and with an
#   Idempotency-Key (step 3 is then skipped).
# The results are printed and kept in target/bench/load-<date>.txt; on a
# failure the logs (redis, services) are kept and their path printed.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=all
case "${1:-}" in
  all | keyed | load | latency) mode="$1"; shift ;;
esac

for tool in redis-server redis-cli curl cargo; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "bench.sh: $tool not found (redis-server and redis-cli: apt-get install redis-server)" >&2
    exit 1
  }
done

workdir="$(mktemp -d -t streamline-bench.XXXXXX)"
redis_pid=""
service_pids=()
taken_ports=" "

stop_pid() { # pid: SIGTERM, up to 10 s to exit, then SIGKILL
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local status="$1"
  trap - EXIT INT TERM
  for pid in "${service_pids[@]}"; do stop_pid "$pid"; done
  if [ -n "$redis_pid" ]; then stop_pid "$redis_pid"; fi
  if [ "$status" = 0 ]; then
    rm -rf "$workdir"
  else
    echo "bench.sh: failed (status $status); logs kept in $workdir" >&2
  fi
}
trap 'cleanup $?' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { # a port nobody listens on and that this script has not handed out
  local port
  for _ in $(seq 100); do
    # Below the kernel's ephemeral range (32768-60999), so no outgoing
    # connection holds it either.
    port=$((20000 + RANDOM % 12000))
    case "$taken_ports" in *" $port "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      taken_ports+="$port "
      echo "$port"
      return 0
    fi
  done
  echo "bench.sh: no free port found" >&2
  return 1
}

wait_for() { # what, command...: retries the command for up to 10 s
  local what="$1"
  shift
  for _ in $(seq 1000); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.01
  done
  echo "bench.sh: $what did not come up within 10 s" >&2
  return 1
}

echo "building (release)..."
cargo build --release --bins --quiet
cargo bench --bench load --no-run --quiet

mkdir -p target/bench
results="target/bench/load-$(date +%Y%m%d-%H%M%S).txt"
{
  echo "# streamline load benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "nproc $(nproc); $(free -h | awk '/^Mem:/ {print "memory " $2 " total, " $7 " available"}')"
  redis-server --version
  rustc --version
  echo
} | tee "$results"

redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$workdir" \
  --save "" --appendonly no --logfile "$workdir/redis.log" >/dev/null &
redis_pid=$!
wait_for "redis-server on port $redis_port" redis-cli -p "$redis_port" ping
REDIS_URL="redis://127.0.0.1:$redis_port"
echo "private redis-server at $REDIS_URL (pid $redis_pid)"

load() { cargo bench --quiet --bench load -- "$@"; }

if [ "${1:-}" = --wan ]; then
  shift
  rows=()
  for rtt in ${RTTS:-0 1 10 50}; do
    for c in ${CLIENTS:-64 256}; do
      echo "RTT $rtt ms, -c $c..."
      out="$(load wan --bin-dir target/release --redis "$REDIS_URL" --redis-pid "$redis_pid" \
        --redis-rtt-ms "$rtt" -c "$c" "$@")"
      echo "$out" >>"$results"
      header="$(echo "$out" | sed -n 's/^wan-header: //p')"
      rows+=("$(echo "$out" | sed -n 's/^wan-row: //p')")
    done
  done
  {
    echo
    echo "$header"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
  } | tee -a "$results"
  echo "results kept in $results"
  exit 0
fi

if [ "$mode" = all ]; then
  load ready --bin-dir target/release --redis "$REDIS_URL" --rounds 5 | tee -a "$results"
fi

order_port=""
for svc in order-service payment-service notification-service; do
  port="$(free_port)"
  REDIS_URL="$REDIS_URL" HTTP_ADDR="127.0.0.1:$port" RUST_LOG=warn \
    "target/release/$svc" >"$workdir/$svc.log" 2>&1 &
  service_pids+=($!)
  wait_for "$svc on port $port" curl -fsS "http://127.0.0.1:$port/readyz"
  echo "$svc on 127.0.0.1:$port (pid $!)"
  if [ "$svc" = order-service ]; then order_port="$port"; fi
done
pids="$(IFS=,; echo "${service_pids[*]}")"

load "$mode" --url "http://127.0.0.1:$order_port" --redis "$REDIS_URL" --pids "$pids" "$@" \
  | tee -a "$results"
echo "results kept in $results"
