#!/usr/bin/env bash
# benches/instructions.sh — user-space instructions per proxied request, counted by callgrind.
#
#   bash benches/instructions.sh [CONFIG.toml ...]     (default: a bare config)
#
# CPU time per request moves by ±10 % between runs on a shared virtual machine; the number of
# instructions ezgate executes per request does not (±1 %: only how requests batch per wake-up
# varies). Use it to compare two builds or two configs, a change at a time; the kernel's share
# (the socket calls, the same for every build as long as the syscalls per request are) is not
# in it, and instructions are not time: the end-to-end benchmark (proxy.sh) has the last word.
#
# For each config: starts the emulator (core 1) and ezgate under `valgrind --tool=callgrind`
# (core 0), warms up with 3 s of wrk, counts instructions over SECS (default 6) seconds of
# `wrk -t1 -c16` with the ~1 KB chat body, and prints instructions per request. The profile
# stays in OUT (default a temp dir) for `callgrind_annotate`.
# Env: EZGATE_BIN, EMULATOR_BIN, SECS, OUT; TLS=1 puts TLS 1.3 between ezgate and the emulator
# (benches/ab.py makes the throwaway CA in OUT/tls and gives each config `upstream.ca_file`,
# in a copy). Installs valgrind and wrk from Debian if missing.
# Traffic goes only to 127.0.0.1, bounded in time; every process started is stopped on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EZGATE="${EZGATE_BIN:-$ROOT/target/release/ezgate}"
EMULATOR="${EMULATOR_BIN:-$ROOT/target/release/ezlink-emulator}"
SECS="${SECS:-6}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -x "$EZGATE" ] && [ -x "$EMULATOR" ] || (cd "$ROOT" && cargo build --release --bins)

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
pin() { if taskset -c "$1" true 2>/dev/null; then echo "taskset -c $1"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 150); do curl -sk -o /dev/null --max-time 1 "$1" && return 0; sleep 0.2; done; return 1; }

# The same ~1 KB chat-completion body as proxy.sh.
export BENCH_BODY_FILE="$OUT/body.json"
python3 "$ROOT/benches/bench_client.py" body "$BENCH_BODY_FILE"

EMU_PORT="$(free_port)"
SCHEME=http; EMU_TLS=()
# benches/ab.py's helpers, as proxy.sh uses them: the throwaway CA, and a config with its ca_file.
ab() { python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import ab; getattr(ab, sys.argv[2])(*sys.argv[3:])' \
  "$ROOT/benches" "$@"; }
if [ "${TLS:-0}" = 1 ]; then
  SCHEME=https
  rm -rf "$OUT/tls"
  ab make_certs "$OUT"
  EMU_TLS=(--tls-cert "$OUT/tls/server.pem" --tls-key "$OUT/tls/server.key")
fi
# shellcheck disable=SC2046
$(pin 1) "$EMULATOR" --listen "127.0.0.1:$EMU_PORT" "${EMU_TLS[@]}" > "$OUT/emu.out" 2>&1 &
PIDS+=($!)
wait_http "$SCHEME://127.0.0.1:$EMU_PORT/v1/models" || { echo "the emulator did not start" >&2; exit 1; }

configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
  printf '[log]\naccess_log = false\n' > "$OUT/bare.toml"
  configs=("$OUT/bare.toml")
fi
for cfg in "${configs[@]}"; do
  port="$(free_port)"; admin="$(free_port)"; label="$(basename "$cfg" .toml)"
  if [ "$SCHEME" = https ]; then
    ab with_ca_file "$cfg" "$OUT/tls/ca.pem" "$OUT/$label.tls.toml"
    cfg="$OUT/$label.tls.toml"
  fi
  # shellcheck disable=SC2046
  $(pin 0) valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.$label.%p" \
    "$EZGATE" --config "$cfg" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --upstream "$SCHEME://127.0.0.1:$EMU_PORT" > "$OUT/$label.log" 2>&1 &
  vg=$!; PIDS+=("$vg")
  wait_http "http://127.0.0.1:$admin/healthz" || { echo "$label: ezgate did not start: $(tail -3 "$OUT/$label.log")" >&2; exit 1; }
  # shellcheck disable=SC2046
  $(pin 1) wrk -t1 -c16 -d3s -s "$ROOT/benches/chat.lua" "http://127.0.0.1:$port" > /dev/null
  callgrind_control -i on "$vg" > /dev/null
  # shellcheck disable=SC2046
  out="$($(pin 1) wrk -t1 -c16 -d"${SECS}s" --timeout 10s -s "$ROOT/benches/chat.lua" "http://127.0.0.1:$port")"
  callgrind_control -i off "$vg" > /dev/null
  callgrind_control -d "$vg" > /dev/null
  sleep 1
  kill "$vg"; wait "$vg" 2>/dev/null || true
  json="$(echo "$out" | sed -n 's/^WRKJSON //p')"
  requests="$(echo "$json" | python3 -c 'import json,sys; d=json.load(sys.stdin); e=sum(d["errors"].values()); print(d["requests"] if e == 0 else -e)')"
  [ "$requests" -gt 0 ] || { echo "$label: wrk saw errors: $json" >&2; exit 1; }
  # The dump taken while counting is the largest file (the one at exit counts nothing).
  profile="$(ls -S "$OUT"/callgrind."$label".* | head -1)"
  total="$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')"
  printf '%-20s %8d requests  %8d instructions per request   (%s)\n' "$label" "$requests" $((total / requests)) "$profile"
done
