#!/usr/bin/env python3
"""benches/ws.py — WebSocket sessions through ezgate, beside nginx configured for WebSockets.

    python3 benches/ws.py [--ezgate BIN] [--emulator BIN] [--sessions 1000] [--messages 2000]
                          [--rounds 3] [--size 1024] [--quick]

Measures, for ezgate and nginx (one worker, `proxy_http_version 1.1`, the `Upgrade` and
`Connection` headers passed on, as nginx's documentation configures WebSockets), in front of
the emulator's `/v1/realtime`:

* memory per open session: the proxy's resident memory (VmRSS, all its processes) before and
  after opening N sessions at once, each past its `session.created`, divided by N;
* per-message delay: one session sends `emu.echo` messages of `--size` bytes one after the
  other and waits for each echo; the round trip through the proxy minus the round trip
  without one ("direct"), p50 and p99, is what the proxy adds to a message going both ways.
  The three targets take turns message by message (who goes first changes every round), so
  all three see the same machine; `--rounds` rounds, medians shown.

The proxies run on one core, the client and the emulator on another (taskset), as in
benches/proxy.sh. Needs Python's `websockets` (target/test-venv, made by .ci/test from
tests/requirements.txt; this script re-runs itself with that interpreter when needed).
Traffic goes only to 127.0.0.1; every process it starts is stopped on exit. Prints a
Markdown table, and one JSON line (`WSJSON {…}`) for other tools.
"""
import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from ab import free_port, nginx_conf, pin, wait_http  # the same helpers as the CPU A/B (benches/ab.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_PY = os.path.join(ROOT, "target/test-venv/bin/python")

try:
    import websockets
    from websockets.asyncio.client import connect
except ImportError:
    if os.path.exists(VENV_PY) and sys.prefix == sys.base_prefix:  # not in a venv yet
        os.execv(VENV_PY, [VENV_PY] + sys.argv)
    sys.exit("ws.py: needs Python's websockets: run .ci/test once (it makes target/test-venv)")

# nginx as a WebSocket proxy: Upgrade and Connection passed on, no buffering.
NGINX_CONF = nginx_conf("""  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://127.0.0.1:{emu};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 300s;
      proxy_buffering off;
    }}
  }}
""", main="worker_rlimit_nofile {nofile};\n", conns="{conns}")


def rss_kb(pids):
    total = 0
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def open_session(port):
    ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime", compression=None,
                       max_size=None, open_timeout=60, ping_interval=None)
    first = json.loads(await asyncio.wait_for(ws.recv(), 60))
    if first.get("type") != "session.created":
        raise RuntimeError(f"unexpected first event {first}")
    return ws


async def memory(port, pids, n):
    """KiB of the proxy's resident memory per open session."""
    before = rss_kb(pids)
    sessions = []
    sem = asyncio.Semaphore(200)

    async def one():
        async with sem:
            sessions.append(await open_session(port))

    await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(1)
    after = rss_kb(pids)
    await asyncio.gather(*(ws.close() for ws in sessions))
    return (after - before) / n


async def round_trips(ports, messages, size):
    """Round-trip times (µs) of `messages` echoes per target, one after the other on one
    session each; the targets take turns message by message, so all see the same machine."""
    sessions = {t: await open_session(port) for t, port in ports.items()}
    payload = json.dumps({"type": "emu.echo", "pad": "x" * max(0, size - 30)})
    times = {t: [] for t in ports}
    for _ in range(messages):
        for t, ws in sessions.items():
            start = time.perf_counter_ns()
            await ws.send(payload)
            await ws.recv()
            times[t].append((time.perf_counter_ns() - start) / 1000)
    await asyncio.gather(*(ws.close() for ws in sessions.values()))
    return times


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ezgate", default=os.path.join(ROOT, "target/release/ezgate"))
    ap.add_argument("--emulator", default=os.path.join(ROOT, "target/release/ezlink-emulator"))
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="100 sessions, 200 messages, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.messages, args.rounds = 100, 200, 1
    if not (1 <= args.sessions <= 20000 and 1 <= args.messages <= 100000 and 1 <= args.rounds <= 10
            and 2 <= args.size <= 1 << 20):
        sys.exit("ws.py: --sessions 1..20000, --messages 1..100000, --rounds 1..10, --size 2..1MiB")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.sessions * 2 + 1000:
        sys.exit(f"ws.py: the open-file limit ({hard}) is too low for {args.sessions} sessions")
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpu, load_cpu = cpus[0], cpus[1 % len(cpus)]
    os.sched_setaffinity(0, {load_cpu})

    work = tempfile.mkdtemp(prefix="ezgate-ws.")
    procs = []
    try:
        emu_port = free_port()
        emu = subprocess.Popen(pin(load_cpu) + [args.emulator, "--listen", f"127.0.0.1:{emu_port}"],
                               stdout=subprocess.DEVNULL)
        procs.append(emu)
        wait_http(f"http://127.0.0.1:{emu_port}/v1/models", emu)

        cfg = os.path.join(work, "ezgate.toml")
        open(cfg, "w").write(f'[server]\nmax_inflight = {args.sessions * 2 + 1000}\n\n'
                             '[upstream]\nstream_idle_timeout = "300s"\n\n[log]\naccess_log = false\n')
        ez_port, ez_admin = free_port(), free_port()
        ez = subprocess.Popen(pin(proxy_cpu) + [args.ezgate, "--config", cfg, "--listen", f"127.0.0.1:{ez_port}",
                                        "--admin-listen", f"127.0.0.1:{ez_admin}",
                                        "--upstream", f"http://127.0.0.1:{emu_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, MIMALLOC_ARENA_EAGER_COMMIT="0"))
        procs.append(ez)
        wait_http(f"http://127.0.0.1:{ez_admin}/healthz", ez)

        ng_port = free_port()
        conf = os.path.join(work, "nginx.conf")
        open(conf, "w").write(NGINX_CONF.format(work=work, emu=emu_port, port=ng_port, nofile=hard,
                                                conns=min(hard, 65536)))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        ng = subprocess.Popen(pin(proxy_cpu) + [nginx, "-p", work, "-e", os.path.join(work, "nginx-error.log"), "-c", conf],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(ng)
        wait_http(f"http://127.0.0.1:{ng_port}/v1/models", ng)
        ng_pids = [ng.pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(ng.pid)], capture_output=True,
                                                               text=True).stdout.split()]
        targets = {"direct": (emu_port, None), "nginx": (ng_port, ng_pids), "ezgate": (ez_port, [ez.pid])}

        async def run():
            rtt = {t: [] for t in targets}
            ports = {t: port for t, (port, _) in targets.items()}
            for r in range(args.rounds):
                # Who goes first changes every round.
                order = dict(list(ports.items())[r % 3:] + list(ports.items())[:r % 3])
                for t, times in (await round_trips(order, args.messages, args.size)).items():
                    rtt[t].append(times)
            mem = {}
            for t in ("nginx", "ezgate"):
                port, pids = targets[t]
                mem[t] = await memory(port, pids, args.sessions)
            return rtt, mem

        rtt, mem = asyncio.run(run())
        p50 = {t: statistics.median(pct(r, 0.5) for r in rtt[t]) for t in targets}
        p99 = {t: statistics.median(pct(r, 0.99) for r in rtt[t]) for t in targets}
        summary = {
            "sessions": args.sessions, "messages": args.messages, "rounds": args.rounds, "size": args.size,
            "rtt_p50_us": p50, "rtt_p99_us": p99,
            "added_p50_us": {t: p50[t] - p50["direct"] for t in ("nginx", "ezgate")},
            "added_p99_us": {t: p99[t] - p99["direct"] for t in ("nginx", "ezgate")},
            "kib_per_session": mem,
        }
        print(f"WebSocket sessions ({args.sessions} open at once; {args.messages} echoes of {args.size} B "
              f"per round, {args.rounds} round(s), medians)")
        print()
        print("| | direct | nginx | ezgate |")
        print("|---|---|---|---|")
        print(f"| round trip p50, µs | {p50['direct']:.0f} | {p50['nginx']:.0f} | {p50['ezgate']:.0f} |")
        print(f"| round trip p99, µs | {p99['direct']:.0f} | {p99['nginx']:.0f} | {p99['ezgate']:.0f} |")
        print(f"| added per message both ways, p50, µs | — | {summary['added_p50_us']['nginx']:.0f} | "
              f"{summary['added_p50_us']['ezgate']:.0f} |")
        print(f"| added per message both ways, p99, µs | — | {summary['added_p99_us']['nginx']:.0f} | "
              f"{summary['added_p99_us']['ezgate']:.0f} |")
        print(f"| memory per open session, KiB | — | {mem['nginx']:.1f} | {mem['ezgate']:.1f} |")
        print("WSJSON " + json.dumps(summary))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
