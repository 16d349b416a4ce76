#!/usr/bin/env python3
"""benches/ab.py — CPU per request of two ezgate builds (or configs), loaded at the same time.

    python3 benches/ab.py A_BIN B_BIN [--config-a F] [--config-b F] [--rounds 8] [--secs 3]
                          [--emu-quota requests=1000000000/1m]
                          [--load chat|sse] [--rate N]
    python3 benches/ab.py nginx B_BIN          (A is nginx, configured as in proxy.sh)

`--load sse` streams each completion (20 events) instead of answering the ~1 KB chat
completion of benches/chat.lua with one JSON body.

On a shared virtual machine CPU time per request moves by ±20 % between runs a few seconds
apart, so two builds measured one after the other cannot be told apart by less than that.
Loaded at the same moment, both see the same machine: each round runs `wrk -t1 -c32` against
A and against B together (the two wrk on the load core, both gateways on the proxy core, one
emulator), reads each gateway's CPU time from /proc/PID/stat, and divides by its requests.
The ratio B/A per round is steady to ±1–2 %; the order in which the two loads start is
swapped every round, which cancels the small advantage of starting second. `nginx` in place
of a binary runs nginx as benches/proxy.sh configures it (its master and worker are counted):
ezgate's CPU per request against nginx's, free of the drift between sequential runs.

`--rate N` adds, after the CPU rounds, as many latency rounds: a fixed-rate open-loop load of N
req/s (benches/bench_client.py rate, 32 connections, --secs long) against A, then B (the order
swapped every round: one Python client at a time keeps up with the rate on the load core), and
prints each build's median p50 and p99 over the rounds. With shared limits in the
configs, each gateway's `ezgate_ratelimit_store_fallbacks_total` is printed at the end: a
check the store did not answer was measured on the local fallback, not on the store.

Prints the median of the per-round ratios and every round. Needs wrk and taskset; starts the
release emulator. Traffic goes only to 127.0.0.1, bounded in time; every process it starts is
stopped on exit.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(url, proc):
    me = os.path.basename(sys.argv[0])
    for _ in range(150):
        if proc.poll() is not None:
            sys.exit(f"{me}: {proc.args[0]} exited: see its output above")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{me}: {url} did not answer")


def ticks(pids):
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


NGINX_CONF = """worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  keepalive_requests 1000000;
  upstream emu {{ server 127.0.0.1:{emu}; keepalive 512; keepalive_requests 1000000; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering off;
  proxy_request_buffering off;
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ proxy_pass http://emu; }} }}
}}
"""


def start_nginx(work, emu_port, port):
    """nginx as benches/proxy.sh runs it (one worker, upstream keepalive, no buffering); its
    processes, master and worker, are what is measured."""
    conf = os.path.join(work, "nginx.conf")
    open(conf, "w").write(NGINX_CONF.format(work=work, emu=emu_port, port=port))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen(pin(0) + [nginx, "-p", work, "-e", os.path.join(work, "nginx-error.log"), "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pin(cpu):
    try:
        subprocess.run(["taskset", "-c", str(cpu), "true"], check=True, capture_output=True)
        return ["taskset", "-c", str(cpu)]
    except (OSError, subprocess.CalledProcessError):
        return []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--config-a")
    ap.add_argument("--config-b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--load", choices=("chat", "sse"), default="chat")
    ap.add_argument("--rate", type=int, default=0, help="req/s of the latency rounds (0: none)")
    ap.add_argument("--emu-quota", help="the emulator's --quota (e.g. requests=1000000000/1m): "
                    "every answer then carries the six x-ratelimit-* headers")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 50 or not 1 <= args.secs <= 30 or not 0 <= args.rate <= 5000:
        sys.exit("ab.py: --rounds 1..50, --secs 1..30 and --rate 0..5000")

    work = subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip()
    body = os.path.join(work, "body.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "benches/bench_client.py"), "body", body], check=True)
    bare = os.path.join(work, "bare.toml")
    open(bare, "w").write("[log]\naccess_log = false\n")

    procs = []
    try:
        emu_port = free_port()
        quota = ["--quota", args.emu_quota] if args.emu_quota else []
        emu = subprocess.Popen(pin(1) + [os.path.join(ROOT, "target/release/ezlink-emulator"),
                                         "--listen", f"127.0.0.1:{emu_port}"] + quota, stdout=subprocess.DEVNULL)
        procs.append(emu)
        wait_http(f"http://127.0.0.1:{emu_port}/v1/models", emu)
        gates, admins = [], {}
        for label, binary, config in (("A", args.a, args.config_a), ("B", args.b, args.config_b)):
            port, admin = free_port(), free_port()
            if binary == "nginx":
                p = start_nginx(work, emu_port, port)
                procs.append(p)
                wait_http(f"http://127.0.0.1:{port}/v1/models", p)
                worker = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
                gates.append((label, port, [p.pid] + [int(w) for w in worker]))
                admins[label] = None
                continue
            p = subprocess.Popen(pin(0) + [binary, "--config", config or bare, "--listen", f"127.0.0.1:{port}",
                                           "--admin-listen", f"127.0.0.1:{admin}",
                                           "--upstream", f"http://127.0.0.1:{emu_port}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=dict(os.environ, MIMALLOC_ARENA_EAGER_COMMIT="0"))
            procs.append(p)
            wait_http(f"http://127.0.0.1:{admin}/healthz", p)
            gates.append((label, port, [p.pid]))
            admins[label] = admin

        env = dict(os.environ, BENCH_BODY_FILE=body)
        if args.load == "sse":
            env["BENCH_SSE_EVENTS"] = "20"

        def load(port, secs):
            return subprocess.Popen(pin(1) + ["wrk", "-t1", "-c32", f"-d{secs}s", "-s",
                                              os.path.join(ROOT, "benches/chat.lua"), f"http://127.0.0.1:{port}"],
                                    stdout=subprocess.PIPE, text=True, env=env)

        for _, port, _ in gates:  # warm-up
            load(port, 1).communicate()
        ratios, cpu = [], {"A": [], "B": []}
        for r in range(args.rounds):
            order = gates if r % 2 == 0 else gates[::-1]
            before = {label: ticks(pids) for label, _, pids in gates}
            running = [(label, load(port, args.secs)) for label, port, _ in order]
            per = {}
            for label, w in running:
                out = w.communicate(timeout=args.secs + 30)[0]
                m = re.search(r"WRKJSON (.*)", out)
                if not m:
                    sys.exit(f"ab.py: wrk printed no summary: {out}")
                j = json.loads(m.group(1))
                if sum(j["errors"].values()):
                    sys.exit(f"ab.py: errors against {label}: {j['errors']}")
                pids = dict((g[0], g[2]) for g in gates)[label]
                per[label] = (ticks(pids) - before[label]) * 1e6 / os.sysconf("SC_CLK_TCK") / j["requests"]
            for label in per:
                cpu[label].append(per[label])
            ratios.append(per["B"] / per["A"])
        print(f"B/A CPU per request: median {statistics.median(ratios):.3f}; rounds "
              + " ".join(f"{x:.3f}" for x in ratios))
        for label in ("A", "B"):
            print(f"{label}: median {statistics.median(cpu[label]):.1f} µs; rounds "
                  + " ".join(f"{x:.1f}" for x in cpu[label]))

        if args.rate:
            lat = {"A": {"p50": [], "p99": []}, "B": {"p50": [], "p99": []}}
            for r in range(args.rounds):
                order = gates if r % 2 == 0 else gates[::-1]
                for label, port, _ in order:
                    out = subprocess.run(
                        pin(1) + [sys.executable, os.path.join(ROOT, "benches/bench_client.py"), "rate",
                                  "--url", f"127.0.0.1:{port}", "--rate", str(args.rate), "--duration",
                                  str(args.secs), "--conns", "32", "--body-file", body, "--timeout", "30"],
                        capture_output=True, text=True, timeout=args.secs + 60).stdout
                    j = json.loads(out)
                    if j.get("error_count"):
                        sys.exit(f"ab.py: fixed-rate run against {label}: {j['errors']}")
                    for k in ("p50", "p99"):
                        lat[label][k].append(j["latency_us"][k])
            for label in ("A", "B"):
                q = lat[label]
                print(f"{label} at {args.rate} req/s: p50 median {statistics.median(q['p50']):.0f} µs, "
                      f"p99 median {statistics.median(q['p99']):.0f} µs; rounds p50 "
                      + " ".join(f"{x:.0f}" for x in q["p50"]) + "; p99 " + " ".join(f"{x:.0f}" for x in q["p99"]))

        for label, admin in admins.items():
            if admin is None:
                continue
            text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
            fb = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("ezgate_ratelimit_store_fallbacks_total")]
            if fb:
                print(f"{label}: {sum(fb):.0f} checks answered by the local fallback (ezgate_ratelimit_store_fallbacks_total)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
