#!/usr/bin/env bash
# benches/proxy.sh — ezgate against nginx (the reference proxy) and against no proxy at all
# ("direct"), on one machine, with the proxy under test pinned to its own core.
#
#   bash benches/proxy.sh            full run (~5 min, plus the build; it waits for a quiet
#                                    machine when others use it): 3 rounds of each measurement
#   bash benches/proxy.sh --quick    CI smoke run (under a minute after installs): 1 short round,
#                                    on the debug build, so no target is judged
#
# Options: --out DIR (keep results there; default a temp dir, removed unless --keep),
#          --keep, --no-build (use existing binaries), --strict (exit 3 if a target is missed),
#          --tls-only (only the TLS-upstream stages: streams held over TLS, ab.py --tls-upstream)
# Env:     EZGATE_BIN, EMULATOR_BIN (override the binaries), RATE (fixed rate, default 1000),
#          LATENCY_TOOL=python (use the Python open-loop client even when oha is installed)
#
# Measures, for direct / nginx / ezgate: max throughput (wrk) for a ~1 KB chat completion;
# latency p50/p99/p99.9 at a fixed rate with coordinated-omission correction (oha, or the
# Python open-loop client when oha is absent); the proxy's CPU time per request (utime+stime
# from /proc/PID/stat); peak RSS (VmHWM) and RSS while N SSE streams are open; and the delay
# each SSE event gains crossing the proxy. Also ezgate with three rate-limit policies plus
# /metrics scrapes, ezgate with its access log on, and one request policy held locally, in a
# standalone Redis and in a Redis Cluster of three primaries (all started here on free
# ports). With a TLS upstream (a throwaway CA made with openssl; TLS 1.3, ALPN h2 and
# http/1.1): memory per open stream for nginx (proxy_pass https://, verification, session
# reuse), ezgate over HTTP/1.1 and ezgate over h2, in front of the emulator serving TLS; then
# benches/ab.py --tls-upstream, nginx and ezgate loaded at the same moment, for the CPU per
# request and p50/p99 at a fixed rate (HTTP/1.1 and h2). Then WebSocket sessions
# (benches/ws.py): memory per open session and per-message delay, beside nginx. See
# docs/performance.md.
#
# Traffic goes only to 127.0.0.1; every load is bounded in count and time; every process this
# script starts is stopped on exit. Any failed stage (a non-200, a short stream, a process
# that does not start) exits non-zero.
set -euo pipefail

MODE=full
OUT=""
KEEP=0
BUILD=1
STRICT=0
TLS_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --out) OUT="$2"; KEEP=1; shift ;;
    --keep) KEEP=1 ;;
    --no-build) BUILD=0 ;;
    --strict) STRICT=1 ;;
    --tls-only) TLS_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
    *) echo "proxy.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$ROOT/benches"
RATE="${RATE:-1000}"

if [ "$MODE" = quick ]; then
  ROUNDS=1; TPUT_S=2; LAT_S=2; WRK_CONNS=32
  HOLD_N=500; SSE_STREAMS=10; SSE_EVENTS=10; SSE_INTERVAL_MS=20
  TLS_AB=(--rounds 1 --secs 1 --rate 200)
  DEADLINE_S=240
else
  ROUNDS=3; TPUT_S=8; LAT_S=10; WRK_CONNS=64
  HOLD_N=10000; SSE_STREAMS=50; SSE_EVENTS=60; SSE_INTERVAL_MS=50
  TLS_AB=(--rounds 4 --secs 3 --rate 500)
  DEADLINE_S=1800
fi
# Slow streams for the memory test: an event every 2 s, 1,000 of them, so every stream stays
# open for the whole hold, and one whose client has gone is noticed (and its sockets closed)
# by the proxy and the emulator within 2 s, before the next target's turn.
HOLD_EVENTS=1000
HOLD_INTERVAL_MS=2000

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'proxy.sh: FAILED: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- processes and cleanup
PIDS=()
WATCHDOG=""
WORK=""
cleanup() {
  local rc=$?
  set +e
  [ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
  if [ -n "$WORK" ] && [ $KEEP = 0 ]; then rm -rf "$WORK"; fi
  [ -n "$WORK" ] && [ $KEEP = 1 ] && log "results kept in $WORK"
  exit $rc
}
trap cleanup EXIT
trap 'log "interrupted (a signal, or the run passed its deadline)"; exit 130' INT TERM

# ---------------------------------------------------------------- tools from package registries
# .ci/apt-install: as root or through sudo; installing nginx or redis-server does not start
# the distribution's services (nginx would take port 80).
apt_install() {
  log "apt-get install $*"
  bash "$ROOT/.ci/apt-install" "$@"
}
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -gt 0 ] && apt_install "${need[@]}"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# Fixed-rate load with coordinated-omission correction: oha (crates.io) does it right; no
# Debian or PyPI tool does (hey/h2load/wrk are closed-loop). `cargo install oha` takes a few
# minutes on 2 cores, so only the full run installs it; --quick uses oha if present, else
# the Python open-loop client in bench_client.py.
OHA="$(command -v oha || true)"
[ -z "$OHA" ] && [ -x "$HOME/.cargo/bin/oha" ] && OHA="$HOME/.cargo/bin/oha"
if [ "${LATENCY_TOOL:-}" = python ]; then
  OHA=""
elif [ -z "$OHA" ] && [ "$MODE" = full ] && command -v cargo >/dev/null 2>&1; then
  log "cargo install --locked oha (a few minutes, once)"
  if cargo install --locked oha >/dev/null 2>&1; then OHA="$HOME/.cargo/bin/oha"; else log "oha did not install; using the Python client"; fi
fi

# ---------------------------------------------------------------- binaries
if [ "$MODE" = quick ]; then PROFILE_DIR=debug; BUILD_ARGS=(--bins); else PROFILE_DIR=release; BUILD_ARGS=(--release --bins); fi
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
EZGATE="${EZGATE_BIN:-$TARGET_DIR/$PROFILE_DIR/ezgate}"
EMULATOR="${EMULATOR_BIN:-$TARGET_DIR/$PROFILE_DIR/ezlink-emulator}"
if [ $BUILD = 1 ] && [ -z "${EZGATE_BIN:-}" ]; then
  log "cargo build --locked ${BUILD_ARGS[*]}"
  (cd "$ROOT" && cargo build --locked "${BUILD_ARGS[@]}" 2>&1 | tail -3) || die "cargo build failed"
fi
[ -x "$EZGATE" ] || die "no ezgate binary at $EZGATE (build it, or set EZGATE_BIN)"
# Targets are judged for release builds only (report.py): a debug build is ~10x slower.
EZGATE_VERSION="$("$EZGATE" --version 2>/dev/null | head -1 || true)"
case "$EZGATE_VERSION" in
  *", release build)") BUILD_PROFILE=release ;;
  *", debug build)") BUILD_PROFILE=debug ;;
  *) BUILD_PROFILE=unknown ;;
esac

# ---------------------------------------------------------------- machine
if [ -z "$OUT" ]; then WORK="$(mktemp -d /tmp/ezgate-bench.XXXXXX)"; else WORK="$OUT"; mkdir -p "$WORK"; fi
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
# Watchdog: the whole run is bounded in time. It holds no output pipe and takes its sleep with it.
( exec >/dev/null 2>&1; trap 'kill $s; exit 0' TERM; sleep "$DEADLINE_S" & s=$!; wait $s; kill -TERM $$ ) &
WATCHDOG=$!

# The proxy under test gets one core; the load generators and the upstream get another.
read -r -a CPUS <<< "$(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
if [ ${#CPUS[@]} -ge 2 ] && taskset -c "${CPUS[0]}" true 2>/dev/null; then
  PROXY_CPU="${CPUS[0]}"; LOAD_CPU="${CPUS[1]}"
  PIN_PROXY=(taskset -c "$PROXY_CPU"); PIN_LOAD=(taskset -c "$LOAD_CPU")
  PINNING="proxy on cpu $PROXY_CPU; load generators and upstream on cpu $LOAD_CPU"
else
  PIN_PROXY=(); PIN_LOAD=(); PINNING="not pinned (fewer than 2 usable cores)"
fi
# 10,000 streams need ~20,000 descriptors in a proxy and 10,000 in the client and upstream.
# Raising the hard limit needs CAP_SYS_RESOURCE; without it, hold as many streams as fit
# (2 per stream in a proxy, plus ~2,000 for listeners and pooled connections) and let
# bench_client.py extrapolate to 10,000 from the measured memory per stream.
HOLD_TARGET=$HOLD_N
ulimit -Hn 262144 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
[ "$NOFILE" = unlimited ] && NOFILE=1048576
if [ "$NOFILE" -lt $((HOLD_N * 2 + 2000)) ]; then
  HOLD_N=$(( (NOFILE - 2000) / 2 / 500 * 500 ))
  log "open-file limit is $NOFILE and cannot be raised here: holding $HOLD_N streams, extrapolating to $HOLD_TARGET"
fi
CLK_TCK="$(getconf CLK_TCK)"
CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
log "mode $MODE; $(nproc) cpus ($CPU_MODEL); kernel $(uname -r); $PINNING"

# ---------------------------------------------------------------- helpers
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# A free port for a Redis Cluster node: its bus port, 10,000 higher, must be free too (Redis
# refuses a node port above 55535).
free_cluster_port() {
  python3 -c '
import socket, sys
for _ in range(1000):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p <= 55535:
        b = socket.socket()
        try:
            b.bind(("127.0.0.1", p + 10000)); print(p); sys.exit(0)
        except OSError:
            pass
        finally:
            b.close()
    s.close()
sys.exit("no free pair of ports (p, p + 10000) for a cluster node")'
}

# start NAME STDERR_FILE CMD... : runs CMD in the background, stdout to $WORK/NAME.out
start() {
  local name="$1" err="$2"; shift 2
  "$@" > "$WORK/$name.out" 2> "$err" &
  PIDS+=($!)
  eval "PID_${name//-/_}=$!"
}
# wait_line NAME REGEX : bounded wait (15 s) for a stdout line; prints its first capture group
wait_line() {
  # $3: the group of $2 that holds the address (default 1).
  local name="$1" re="$2" group="${3:-1}" pid
  pid="$(eval echo "\$PID_${name//-/_}")"
  for _ in $(seq 1 150); do
    if grep -qE "$re" "$WORK/$name.out" 2>/dev/null; then
      sed -nE "s/$re/\\$group/p" "$WORK/$name.out" | head -1
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
# cpu_ticks PID... : utime+stime of all the processes, in clock ticks (threads included)
cpu_ticks() {
  local sum=0 p v
  for p in "$@"; do
    v="$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat")" || die "process $p is gone"
    sum=$((sum + v))
  done
  echo "$sum"
}
# mem_kb FIELD PID... : sum of VmHWM / VmRSS
mem_kb() {
  local field="$1" sum=0 p v; shift
  for p in "$@"; do
    v="$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$p/status")" || die "process $p is gone"
    sum=$((sum + v))
  done
  echo "$sum"
}
post_ok() {  # post_ok URL : one chat completion must answer 200
  local code
  code="$(curl -sS -o "$WORK/last-body" -w '%{http_code}' --max-time 5 -H 'content-type: application/json' \
          -H 'authorization: Bearer sk-bench-0000000000000000' --data-binary "@$BODY" "http://$1/v1/chat/completions")" || true
  [ "$code" = 200 ] || die "POST http://$1/v1/chat/completions answered ${code:-nothing}: $(head -c 300 "$WORK/last-body" 2>/dev/null)"
}

# A ~1 KB chat-completion body (the size of a short real prompt).
BODY="$WORK/body.json"
python3 "$BENCH/bench_client.py" body "$BODY"
export BENCH_BODY_FILE="$BODY"

# ---------------------------------------------------------------- upstreams
UPSTREAM_KIND=emulator
EMU_ADDR=""
if [ -x "$EMULATOR" ]; then
  start emu "$WORK/emu.err" "${PIN_LOAD[@]}" "$EMULATOR" --listen 127.0.0.1:0
  EMU_ADDR="$(wait_line emu '^listening on ([0-9.:]+).*')" || EMU_ADDR=""
fi
if [ -z "$EMU_ADDR" ]; then
  log "WARNING: ezlink-emulator missing or not starting ($EMULATOR); using benches/sse_origin.py as the upstream"
  UPSTREAM_KIND="sse_origin.py stand-in"
  start emu "$WORK/emu.err" "${PIN_LOAD[@]}" python3 "$BENCH/sse_origin.py" --listen 127.0.0.1:0
  EMU_ADDR="$(wait_line emu '^listening on ([0-9.:]+).*')" || die "stand-in upstream did not start"
fi
start origin "$WORK/origin.err" "${PIN_LOAD[@]}" python3 "$BENCH/sse_origin.py" --listen 127.0.0.1:0
ORIGIN_ADDR="$(wait_line origin '^listening on ([0-9.:]+).*')" || die "sse_origin.py did not start"
log "upstream ($UPSTREAM_KIND) on $EMU_ADDR; timestamping SSE origin on $ORIGIN_ADDR"
# The TLS upstream for the streams held over TLS: the emulator with a certificate of a
# throwaway CA (benches/ab.py makes both, ECDSA P-256, in $WORK/tls), offering h2 and
# http/1.1 by ALPN, as EZLINK does.
python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import ab; ab.make_certs(sys.argv[2])' "$BENCH" "$WORK" \
  || die "could not make the throwaway CA and certificate (openssl)"
CA="$WORK/tls/ca.pem"
[ -x "$EMULATOR" ] || die "the TLS-upstream stage needs ezlink-emulator ($EMULATOR)"
start emu-tls "$WORK/emu-tls.err" "${PIN_LOAD[@]}" "$EMULATOR" --listen 127.0.0.1:0 \
  --tls-cert "$WORK/tls/server.pem" --tls-key "$WORK/tls/server.key"
EMU_TLS_ADDR="$(wait_line emu-tls '^listening on ([0-9.:]+).*')" || die "the emulator did not start with TLS: $(tail -3 "$WORK/emu-tls.err")"
log "TLS upstream (emulator, ALPN h2 + http/1.1) on $EMU_TLS_ADDR"

# ---------------------------------------------------------------- nginx (reference proxy)
NGINX_PORT="$(free_port)"; NGINX_SSE_PORT="$(free_port)"; NGINX_TLS_PORT="$(free_port)"
mkdir -p "$WORK/nginx/tmp" "$WORK/nginx/logs"
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $(( NOFILE < 65536 ? NOFILE : 65536 )); }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  keepalive_requests 1000000;
  client_max_body_size 16m;
  upstream emu    { server $EMU_ADDR;    keepalive 512; keepalive_requests 1000000; }
  upstream origin { server $ORIGIN_ADDR; keepalive 512; keepalive_requests 1000000; }
  upstream emu_tls { server $EMU_TLS_ADDR; keepalive 512; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering off;
  proxy_request_buffering off;
  proxy_read_timeout 300s;
  server { listen 127.0.0.1:$NGINX_PORT backlog=4096;     location / { proxy_pass http://emu; } }
  server { listen 127.0.0.1:$NGINX_SSE_PORT backlog=4096; location / { proxy_pass http://origin; } }
  server {
    listen 127.0.0.1:$NGINX_TLS_PORT backlog=4096;
    location / {
      proxy_pass https://emu_tls;
      proxy_ssl_verify on;
      proxy_ssl_verify_depth 2;
      proxy_ssl_trusted_certificate $CA;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
      proxy_ssl_protocols TLSv1.3;
    }
  }
}
EOF
start nginx "$WORK/nginx/logs/stderr.log" "${PIN_PROXY[@]}" "$NGINX" -p "$WORK/nginx" -e "$WORK/nginx/logs/error.log" -c "$WORK/nginx/nginx.conf"

# ---------------------------------------------------------------- redis (shared limits)
REDIS_PORT="$(free_port)"
start redis "$WORK/redis.err" "${PIN_LOAD[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
# A Redis Cluster of three primaries (no replicas: the row measures the gateway's side).
CLUSTER_PORTS=()
for i in 1 2 3; do
  p="$(free_cluster_port)"; CLUSTER_PORTS+=("$p"); mkdir -p "$WORK/cluster/$p"
  start "cluster$i" "$WORK/cluster/$p/stderr" "${PIN_LOAD[@]}" redis-server --port "$p" --bind 127.0.0.1 --save "" \
    --appendonly no --dir "$WORK/cluster/$p" --cluster-enabled yes --cluster-config-file nodes.conf
done
for p in "$REDIS_PORT" "${CLUSTER_PORTS[@]}"; do
  for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$p" ping >/dev/null 2>&1 || die "redis-server on port $p did not start"
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") --cluster-yes > "$WORK/cluster/create.out" 2>&1 \
  || die "redis-cli --cluster create failed: $(tail -5 "$WORK/cluster/create.out")"
for p in "${CLUSTER_PORTS[@]}"; do
  for _ in $(seq 1 100); do redis-cli -p "$p" cluster info 2>/dev/null | grep -q cluster_state:ok && break; sleep 0.1; done
  redis-cli -p "$p" cluster info | grep -q cluster_state:ok || die "the cluster node on port $p is not ok"
done
CLUSTER_NODES="$(printf '"redis://127.0.0.1:%s", ' "${CLUSTER_PORTS[@]}")"
CLUSTER_NODES="[${CLUSTER_NODES%, }]"

# ---------------------------------------------------------------- ezgate (three configs)
write_cfg() {  # write_cfg FILE ACCESS_LOG [limits]
  {
    printf '[server]\nmax_inflight = %d\n\n[upstream]\nstream_idle_timeout = "300s"\n\n' $((HOLD_N * 2 + 1000))
    printf '[log]\nformat = "json"\naccess_log = %s\n' "$2"
    if [ "${3:-}" = limits ]; then
      cat <<'EOF'

[[limits]]
name = "per-key"
key = "api_key"
requests = "1000000/s"

[[limits]]
name = "per-ip-concurrency"
key = "ip"
concurrency = 100000

[[limits]]
name = "per-model-tokens"
key = "model"
tokens = "2000000000/min"
EOF
    fi
  } > "$1"
}
write_one() {  # write_one FILE STORE [REDIS] : one request policy per API key, local or in Redis
  printf '[server]\nmax_inflight = %d\n\n[log]\naccess_log = false\n\n[redis]\n%s\n\n[[limits]]\nname = "per-key"\nkey = "api_key"\nrequests = "1000000/s"\nstore = "%s"\n' \
    $((HOLD_N * 2 + 1000)) "${3:-url = \"redis://127.0.0.1:$REDIS_PORT\"}" "$2" > "$1"
}
write_one "$WORK/ezgate-local1.toml" local
write_one "$WORK/ezgate-redis.toml" redis
write_one "$WORK/ezgate-cluster.toml" redis "mode = \"cluster\"
nodes = $CLUSTER_NODES"
write_cfg "$WORK/ezgate-bare.toml" false
write_cfg "$WORK/ezgate-policies.toml" false limits
write_cfg "$WORK/ezgate-log.toml" true
write_cfg "$WORK/ezgate-sse.toml" false
# The same gateway with an HTTP/2 upstream (h2c to the emulator), as EZLINK over TLS is reached:
# streams share upstream connections instead of holding one each.
write_cfg "$WORK/ezgate-h2.toml" false
sed -i 's/^\[upstream\]$/[upstream]\nhttp2 = "always"/' "$WORK/ezgate-h2.toml"
# The same gateway in front of the TLS upstream, trusting the throwaway CA: HTTP/1.1
# (http2 = "never") and the default, http2 = "auto", where ALPN picks h2.
write_cfg "$WORK/ezgate-tls-h1.toml" false
sed -i "s|^\[upstream\]\$|[upstream]\nhttp2 = \"never\"\nca_file = \"$CA\"|" "$WORK/ezgate-tls-h1.toml"
write_cfg "$WORK/ezgate-tls-h2.toml" false
sed -i "s|^\[upstream\]\$|[upstream]\nhttp2 = \"auto\"\nca_file = \"$CA\"|" "$WORK/ezgate-tls-h2.toml"
for c in policies cluster tls-h1 tls-h2; do
  "$EZGATE" check-config --config "$WORK/ezgate-$c.toml" > "$WORK/check-config.out" 2>&1 \
    || die "ezgate rejects the bench config ezgate-$c.toml: $(cat "$WORK/check-config.out")"
done
ez() {  # ez NAME CONFIG UPSTREAM STDERR [SCHEME] — started as the deploy kit runs it (deploy/)
  start "$1" "$4" "${PIN_PROXY[@]}" env MIMALLOC_ARENA_EAGER_COMMIT="${MIMALLOC_ARENA_EAGER_COMMIT:-0}" \
    "$EZGATE" --config "$2" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --upstream "${5:-http}://$3"
}
ez ezgate "$WORK/ezgate-bare.toml" "$EMU_ADDR" "$WORK/ezgate.err"
ez ezgate-policies "$WORK/ezgate-policies.toml" "$EMU_ADDR" "$WORK/ezgate-policies.err"
ez ezgate-log "$WORK/ezgate-log.toml" "$EMU_ADDR" /dev/null
ez ezgate-sse "$WORK/ezgate-sse.toml" "$ORIGIN_ADDR" "$WORK/ezgate-sse.err"
ez ezgate-local1 "$WORK/ezgate-local1.toml" "$EMU_ADDR" "$WORK/ezgate-local1.err"
ez ezgate-redis "$WORK/ezgate-redis.toml" "$EMU_ADDR" "$WORK/ezgate-redis.err"
ez ezgate-cluster "$WORK/ezgate-cluster.toml" "$EMU_ADDR" "$WORK/ezgate-cluster.err"
ez ezgate-h2 "$WORK/ezgate-h2.toml" "$EMU_ADDR" "$WORK/ezgate-h2.err"
ez ezgate-tls-h1 "$WORK/ezgate-tls-h1.toml" "$EMU_TLS_ADDR" "$WORK/ezgate-tls-h1.err" https
ez ezgate-tls-h2 "$WORK/ezgate-tls-h2.toml" "$EMU_TLS_ADDR" "$WORK/ezgate-tls-h2.err" https

declare -A ADDR ADMIN SSE_ADDR PROCS
ADDR[direct]="$EMU_ADDR"; SSE_ADDR[direct]="$ORIGIN_ADDR"; PROCS[direct]=""
ADDR[nginx]="127.0.0.1:$NGINX_PORT"; SSE_ADDR[nginx]="127.0.0.1:$NGINX_SSE_PORT"
ADDR[nginx-tls]="127.0.0.1:$NGINX_TLS_PORT"
for n in ezgate ezgate-policies ezgate-log ezgate-sse ezgate-local1 ezgate-redis ezgate-cluster ezgate-h2 ezgate-tls-h1 ezgate-tls-h2; do
  # The line is text, or a JSON log line with log.format = "json" (the default).
  ADDR[$n]="$(wait_line "$n" '^(.*"message":")?listening on ([0-9.:]+).*' 2)" || die "$n did not start: $(tail -5 "$WORK/$n.err" 2>/dev/null)"
  ADMIN[$n]="$(wait_line "$n" '^(.*"message":")?admin listening on ([0-9.:]+).*' 2)" || die "$n printed no admin address"
  PROCS[$n]="$(eval echo "\$PID_${n//-/_}")"
done
SSE_ADDR[ezgate]="${ADDR[ezgate-sse]}"
for _ in $(seq 1 50); do
  curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$NGINX_PORT/" && break
  kill -0 "$PID_nginx" 2>/dev/null || die "nginx did not start: $(tail -5 "$WORK/nginx/logs/error.log")"
  sleep 0.1
done
PROCS[nginx]="$PID_nginx $(pgrep -P "$PID_nginx" | tr '\n' ' ')"
PROCS[nginx-sse]="${PROCS[nginx]}"
PROCS[nginx-tls]="${PROCS[nginx]}"
for t in direct nginx ezgate ezgate-policies ezgate-log ezgate-local1 ezgate-redis ezgate-cluster ezgate-h2 \
         nginx-tls ezgate-tls-h1 ezgate-tls-h2; do post_ok "${ADDR[$t]}"; done
log "nginx on ${ADDR[nginx]} (pids ${PROCS[nginx]}); ezgate on ${ADDR[ezgate]}; all answer 200"

TOOL_LAT="python open-loop client (bench_client.py rate)"
[ -n "$OHA" ] && TOOL_LAT="oha $("$OHA" --version 2>/dev/null | awk '{print $2}') -q $RATE --latency-correction"
printf '{"phase":"meta","mode":"%s","profile":"%s","ezgate":"%s","nproc":%d,"cpu":"%s","kernel":"%s","pinning":"%s","rate":%d,"streams":%d,"streams_measured":%d,"upstream":"%s","latency_tool":"%s","wrk":"wrk -t1 -c%d -d%ss","rounds":%d}\n' \
  "$MODE" "$BUILD_PROFILE" "$EZGATE_VERSION" "$(nproc)" "$CPU_MODEL" "$(uname -r)" "$PINNING" "$RATE" "$HOLD_TARGET" "$HOLD_N" "$UPSTREAM_KIND" "$TOOL_LAT" \
  "$WRK_CONNS" "$TPUT_S" "$ROUNDS" >> "$RESULTS"

# ---------------------------------------------------------------- measurements
# The machine may be shared with builds and tests. Every timed run is accounted: CPU used on
# the whole machine (/proc/stat) minus CPU used by the processes of this benchmark (the
# servers, and the load generator via this shell's reaped-children times) is what other
# processes took during the run. A run they disturbed by more than FOREIGN_MAX % of a core
# is repeated, after waiting for a quiet machine, at most twice; the table reports the worst
# disturbance among the runs it kept.
FOREIGN_MAX=20
ALL_PIDS="${PIDS[*]} $(pgrep -P "$PID_nginx" | tr '\n' ' ')"
acct() {  # prints: machine-busy-ticks our-ticks children-ticks now-ns
  local o=0 p v
  for p in $ALL_PIDS; do
    v="$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null)" && o=$((o + ${v:-0}))
  done
  echo "$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat) $o $(awk '{sub(/^.*\) /, ""); print $14 + $15}' "/proc/$$/stat") $(date +%s%N)"
}
foreign_pct() {  # foreign_pct "ACCT_BEFORE" "ACCT_AFTER" : other processes' CPU, % of one core
  python3 -c 'import sys; a=list(map(int,sys.argv[1].split())); b=list(map(int,sys.argv[2].split())); t=int(sys.argv[3])
secs=max(1e-3,(b[3]-a[3])/1e9); f=(b[0]-a[0])-(b[1]-a[1])-(b[2]-a[2]); print(max(0,round(f*100/t/secs)))' "$1" "$2" "$CLK_TCK"
}
disturbed() {  # disturbed PCT TRY TARGET : true when this run should be repeated
  [ "$MODE" = full ] && [ "$1" -gt "$FOREIGN_MAX" ] && [ "$2" -lt 3 ] || return 1
  log "  $3: other processes took ${1}% of a core during the run; repeating it"
  return 0
}
# with_retries FUNC ARGS... : FUNC gets the try number as its last argument and returns 75
# to ask for a repeat
with_retries() {
  local try rc
  for try in 1 2 3; do
    rc=0
    "$@" "$try" || rc=$?
    [ $rc = 0 ] && return 0
    [ $rc = 75 ] || exit "$rc"
    wait_quiet "repeat"
  done
}

# wrk_run TARGET ROUND SECONDS TRY : max throughput, 1 wrk thread on the load core
wrk_run() {
  local t="$1" round="$2" secs="$3" try="$4" before after out json scraper="" a0 a1 fp
  a0="$(acct)"
  # shellcheck disable=SC2086
  before="$(cpu_ticks ${PROCS[$t]})"
  if [ "$t" = ezgate-policies ]; then  # metrics on: a scrape every second, as a busy Prometheus would
    ( for _ in $(seq 1 $((secs + 2))); do curl -s -o /dev/null --max-time 2 "http://${ADMIN[$t]}/metrics"; sleep 1; done ) &
    scraper=$!
  fi
  out="$(timeout $((secs + 30)) "${PIN_LOAD[@]}" wrk -t1 -c"$WRK_CONNS" -d"${secs}s" --timeout 5s \
         -s "$BENCH/chat.lua" "http://${ADDR[$t]}")" || die "wrk against $t failed: $out"
  [ -n "$scraper" ] && { kill "$scraper" 2>/dev/null; wait "$scraper" 2>/dev/null || true; }
  # shellcheck disable=SC2086
  after="$(cpu_ticks ${PROCS[$t]})"
  a1="$(acct)"
  json="$(printf '%s\n' "$out" | sed -n 's/^WRKJSON //p')"
  [ -n "$json" ] || die "wrk printed no summary for $t: $out"
  python3 "$BENCH/bench_client.py" show wrk "$json" "$t" > "$WORK/show.out" || die "$(cat "$WORK/show.out")"
  [ "$round" = warm ] && return 0
  fp="$(foreign_pct "$a0" "$a1")"
  disturbed "$fp" "$try" "$t" && return 75
  printf '{"phase":"tput","target":"%s","round":%s,"foreign_pct":%s,"cpu_ticks":%s,"clk_tck":%s,%s\n' \
    "$t" "$round" "$fp" "$([ -n "${PROCS[$t]}" ] && echo $((after - before)) || echo null)" "$CLK_TCK" "${json#\{}" >> "$RESULTS"
  cat "$WORK/show.out" >&2
}

# lat_run TARGET ROUND TRY : fixed rate, coordinated-omission corrected
lat_run() {
  local t="$1" round="$2" try="$3" before after out n=$((RATE * LAT_S)) a0 a1 fp
  a0="$(acct)"
  # shellcheck disable=SC2086
  before="$(cpu_ticks ${PROCS[$t]})"
  if [ -n "$OHA" ]; then
    out="$(timeout $((LAT_S + 30)) "${PIN_LOAD[@]}" "$OHA" --no-tui --output-format json -n "$n" -q "$RATE" \
           --latency-correction -c 32 -t 10s -m POST -T application/json \
           -H 'authorization: Bearer sk-bench-0000000000000000' -D "$BODY" "http://${ADDR[$t]}/v1/chat/completions" 2>&1)" \
      || die "oha against $t failed: $(printf '%s' "$out" | tail -5)"
  else
    out="$(timeout $((LAT_S + 40)) "${PIN_LOAD[@]}" python3 "$BENCH/bench_client.py" rate --url "${ADDR[$t]}" \
           --rate "$RATE" --duration "$LAT_S" --conns 32 --body-file "$BODY" --timeout 30)" \
      || die "fixed-rate run against $t failed: $out"
  fi
  # shellcheck disable=SC2086
  after="$(cpu_ticks ${PROCS[$t]})"
  a1="$(acct)"
  if [ -n "$OHA" ]; then
    out="$(python3 "$BENCH/bench_client.py" oha-json "$n" <<< "$out")" || die "fixed-rate run against $t: $out"
  fi
  fp="$(foreign_pct "$a0" "$a1")"
  disturbed "$fp" "$try" "$t" && return 75
  printf '{"phase":"lat","target":"%s","round":%s,"foreign_pct":%s,"cpu_ticks":%s,"clk_tck":%s,%s\n' \
    "$t" "$round" "$fp" "$([ -n "${PROCS[$t]}" ] && echo $((after - before)) || echo null)" "$CLK_TCK" "${out#\{}" >> "$RESULTS"
  python3 "$BENCH/bench_client.py" show lat "$out" "$t" >&2
}

sse_run() {  # sse_run TARGET ROUND TRY
  local t="$1" round="$2" try="$3" out a0 a1 fp
  a0="$(acct)"
  out="$(timeout 120 "${PIN_LOAD[@]}" python3 "$BENCH/bench_client.py" sse-delay --url "${SSE_ADDR[$t]}" \
         --streams "$SSE_STREAMS" --events "$SSE_EVENTS" --interval-ms "$SSE_INTERVAL_MS" --timeout 90)" \
    || die "SSE delay run via $t failed: $out"
  a1="$(acct)"
  fp="$(foreign_pct "$a0" "$a1")"
  disturbed "$fp" "$try" "$t" && return 75
  printf '{"phase":"sse","target":"%s","round":%s,"foreign_pct":%s,%s\n' "$t" "$round" "$fp" "${out#\{}" >> "$RESULTS"
  python3 "$BENCH/bench_client.py" show sse "$out" "$t" >&2
}

hold_run() {  # hold_run TARGET : N slow SSE streams open at once; RSS of the proxy meanwhile
  local t="$1" out pids
  pids="$(echo "${PROCS[$t]}" | xargs | tr ' ' ',')"
  out="$(timeout 150 "${PIN_LOAD[@]}" python3 "$BENCH/bench_client.py" hold --url "${ADDR[$t]}" --n "$HOLD_N" \
         --events "$HOLD_EVENTS" --interval-ms "$HOLD_INTERVAL_MS" --pids "$pids" --hold-s 2 --steps 4 --target-n "$HOLD_TARGET" \
         --timeout 90)" \
    || die "holding $HOLD_N streams via $t failed: $out"
  printf '{"phase":"hold","target":"%s",%s\n' "$t" "${out#\{}" >> "$RESULTS"
  python3 "$BENCH/bench_client.py" show hold "$out" "$t" >&2
}

# Before each round: wait (bounded) until other processes use less than a fifth of a core.
busy_pct() {  # CPU used by everything over 1 s while this script's load is idle, % of one core
  local a b
  a="$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat)"; sleep 1
  b="$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat)"
  echo $(( (b - a) * 100 / CLK_TCK ))
}
wait_quiet() {  # wait_quiet LABEL
  local pct waited=0
  pct="$(busy_pct)"
  while [ "$MODE" = full ] && [ "$pct" -gt 20 ] && [ $waited -lt 60 ]; do
    [ $waited = 0 ] && log "other processes use ${pct}% of a core; waiting up to 60 s for a quiet machine"
    sleep 4; waited=$((waited + 5)); pct="$(busy_pct)"
  done
  printf '{"phase":"noise","target":null,"label":"%s","busy_pct":%s,"waited_s":%s}\n' "$1" "$pct" "$waited" >> "$RESULTS"
}

fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
hold_each() {  # hold_each UPSTREAM_PID TARGET... : hold_run each target in turn
  # The upstream holds one socket per stream until it notices the client left (within one
  # event interval): wait (bounded) so the next target starts with the upstream's fds free.
  local up="$1" idle t; shift
  idle="$(fd_count "$up")"
  for t in "$@"; do
    hold_run "$t"
    for _ in $(seq 1 100); do
      [ "$(fd_count "$up")" -le $((idle + 600)) ] && break
      sleep 0.2
    done
  done
}
# --tls-only: only the TLS-upstream stages (the streams held over TLS, then ab.py below).
if [ $TLS_ONLY = 0 ]; then
  log "warm-up"
  for t in direct nginx ezgate ezgate-policies ezgate-log ezgate-local1 ezgate-redis ezgate-cluster; do wrk_run "$t" warm 1 1; done
  for r in $(seq 1 "$ROUNDS"); do
    wait_quiet "throughput round $r"
    log "throughput round $r/$ROUNDS (wrk -t1 -c$WRK_CONNS, ${TPUT_S}s each)"
    for t in direct nginx ezgate ezgate-policies ezgate-log ezgate-local1 ezgate-redis ezgate-cluster; do with_retries wrk_run "$t" "$r" "$TPUT_S"; done
  done
  for r in $(seq 1 "$ROUNDS"); do
    wait_quiet "fixed-rate round $r"
    log "fixed rate round $r/$ROUNDS ($RATE req/s for ${LAT_S}s; $TOOL_LAT)"
    for t in direct nginx ezgate ezgate-local1 ezgate-redis ezgate-cluster; do with_retries lat_run "$t" "$r"; done
  done
  for t in nginx ezgate; do
    # shellcheck disable=SC2086
    printf '{"phase":"mem","target":"%s","hwm_kb":%s,"rss_kb":%s}\n' "$t" "$(mem_kb VmHWM ${PROCS[$t]})" "$(mem_kb VmRSS ${PROCS[$t]})" >> "$RESULTS"
  done
  for r in $(seq 1 "$ROUNDS"); do
    wait_quiet "SSE round $r"
    log "SSE per-event delay round $r/$ROUNDS ($SSE_STREAMS streams x $SSE_EVENTS events, ${SSE_INTERVAL_MS} ms apart)"
    for t in direct nginx ezgate; do with_retries sse_run "$t" "$r"; done
  done
  wait_quiet "streams"
  log "$HOLD_N SSE streams open at once"
  hold_each "$PID_emu" direct nginx ezgate ezgate-h2
fi
wait_quiet "streams over TLS"
log "$HOLD_N SSE streams open at once, TLS upstream"
# --tls-only holds the h2c streams here too, so that one run compares TLS h2 with h2c.
TLS_HOLDS=(nginx-tls ezgate-tls-h1 ezgate-tls-h2)
[ $TLS_ONLY = 1 ] && TLS_HOLDS+=(ezgate-h2)
hold_each "$PID_emu_tls" "${TLS_HOLDS[@]}"
for t in nginx ezgate; do
  # shellcheck disable=SC2086
  printf '{"phase":"hwm_end","target":"%s","hwm_kb":%s}\n' "$t" "$(mem_kb VmHWM ${PROCS[$t]})" >> "$RESULTS"
done
for t in ezgate ezgate-policies ezgate-log ezgate-sse ezgate-local1 ezgate-redis ezgate-cluster ezgate-h2 \
         ezgate-tls-h1 ezgate-tls-h2; do
  kill -0 "${PROCS[$t]}" 2>/dev/null || die "$t exited during the run"
done

for t in ezgate-redis ezgate-cluster; do
  fallbacks="$(curl -s --max-time 5 "http://${ADMIN[$t]}/metrics" | awk '/^ezgate_ratelimit_store_fallbacks_total/ {s += $2} END {print s + 0}')"
  # Each check has redis.timeout (50 ms): a debug build on a busy machine can miss it, which
  # is timing, not a fault, so only a release build must have Redis answer every check.
  if [ "$fallbacks" != 0 ]; then
    msg="$t fell back to local limits $fallbacks times: Redis did not answer every check within redis.timeout"
    [ "$BUILD_PROFILE" = release ] && die "$msg"
    log "$msg ($BUILD_PROFILE build: not judged)"
  fi
done

# ---------------------------------------------------------------- TLS upstream: CPU at the same moment
# nginx (proxy_pass https://) and ezgate loaded together by benches/ab.py --tls-upstream, an
# nginx upstream speaking TLS 1.3 with ALPN h2 + http/1.1; ezgate as shipped (access log on,
# to a file), over HTTP/1.1 (benches/tls/h1.toml) and with the default http2 = "auto" (h2
# here, benches/tls/auto.toml). The servers above are idle meanwhile. ab.py starts its own
# processes on the same two cores and writes one "ab" line per comparison to results.jsonl.
for c in h1 auto; do
  wait_quiet "TLS upstream, ab.py $c"
  log "TLS upstream: nginx and ezgate ($c) at the same moment (benches/ab.py --tls-upstream ${TLS_AB[*]})"
  timeout 600 python3 "$BENCH/ab.py" nginx "$EZGATE" --config-b "$BENCH/tls/$c.toml" --tls-upstream "${TLS_AB[@]}" \
    --json "$RESULTS" --label "tls-$c" > "$WORK/ab-tls-$c.out" 2>&1 \
    || die "benches/ab.py --tls-upstream ($c) failed: $(tail -5 "$WORK/ab-tls-$c.out")"
  sed 's/^/  /' "$WORK/ab-tls-$c.out" >&2
done

echo
echo "ezgate benchmark ($MODE): $(nproc) cpus, $CPU_MODEL, kernel $(uname -r); $PINNING"
echo "upstream: $UPSTREAM_KIND; fixed-rate tool: $TOOL_LAT; rounds: $ROUNDS (medians shown)"
echo "ezgate: ${EZGATE_VERSION:-version unknown}"
report_args=("$RESULTS" --markdown "$WORK/table.md" --json "$WORK/summary.json")
[ $STRICT = 1 ] && report_args+=(--strict)
python3 "$BENCH/report.py" "${report_args[@]}"

# ---------------------------------------------------------------- WebSocket sessions
# Memory per open session and the delay a message gains, beside nginx configured for
# WebSockets (benches/ws.py starts its own emulator, ezgate and nginx; the servers above are
# idle by now). It needs Python's websockets, from the venv .ci/test makes.
if [ $TLS_ONLY = 1 ]; then
  :
elif [ -x "$ROOT/target/test-venv/bin/python" ]; then
  log "WebSocket sessions (benches/ws.py)"
  ws_args=(--ezgate "$EZGATE" --emulator "$EMULATOR")
  [ "$MODE" = quick ] && ws_args+=(--quick)
  echo
  timeout 600 "$ROOT/target/test-venv/bin/python" "$BENCH/ws.py" "${ws_args[@]}" > "$WORK/ws.out" \
    || die "benches/ws.py failed: $(tail -5 "$WORK/ws.out")"
  grep -v '^WSJSON ' "$WORK/ws.out"
else
  log "no target/test-venv (.ci/test makes it): the WebSocket stage is skipped"
fi
