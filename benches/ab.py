#!/usr/bin/env python3
"""benches/ab.py — CPU per request of two ezgate builds (or configs), loaded at the same time.

    python3 benches/ab.py A_BIN B_BIN [--config-a F] [--config-b F] [--rounds 8] [--secs 3]
                          [--emu-quota requests=1000000000/1m]
                          [--load chat|sse] [--rate N] [--tls-upstream]
                          [--json FILE --label NAME]
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

`--tls-upstream` puts TLS between the proxies and their upstream, as between ezgate and
EZLINK: a throwaway CA and a certificate for 127.0.0.1/localhost (ECDSA P-256, made with
`openssl` in the run's temp dir and removed with it); the upstream is an nginx on the load core
speaking TLS 1.3 only and offering h2 and http/1.1 by ALPN, answering every request with a
fixed ~1 KB chat completion (with `--load sse`, the release emulator serving TLS instead,
which streams). ezgate gets its config plus `upstream.ca_file` (a temp copy; the access log
stays as the config says: on unless it turns it off, written to a file in the temp dir) and
`--upstream https://127.0.0.1:PORT`; nginx as a proxy uses `proxy_pass https://` with
`proxy_ssl_verify`, the CA, `proxy_ssl_name localhost`, session reuse and TLS 1.3. The
configs of benches/tls/ choose HTTP/1.1 (`h1*.toml`) or the default ALPN (`auto*.toml`, h2
here), with and without the access log. After the CPU rounds each gateway's open connections to
the upstream are counted: a handful with h2, one per connection of load with HTTP/1.1.

Prints the median of the per-round ratios and every round, and each side's CPU per request
with its user and system shares (on loopback, much of the receiver's TCP work is done in
the sender's system time). Needs wrk and taskset (and openssl with --tls-upstream); starts
the release emulator (or the TLS upstream nginx). Traffic goes only to 127.0.0.1, bounded
in time; every process it starts is stopped on exit (SIGTERM included, as `timeout` sends
it) and its temp dir removed.
"""
import argparse
import json
import os
import re
import shutil
import signal
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
    """CPU time of `pids` so far, in clock ticks: (user, system)."""
    user = system = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def nginx_conf(http, main="", conns="4096"):
    """An nginx.conf as a `str.format` template (fill in `work` and the placeholders of `main`
    and `http`): one worker in the foreground, its pid, error log and temp files in `work`, no
    access log; `main` goes before the events block, `http` inside the http block."""
    return ("worker_processes 1;\ndaemon off;\npid {work}/nginx.pid;\nerror_log {work}/nginx-error.log warn;\n"
            + main + "events {{ worker_connections " + conns + "; }}\nhttp {{\n" + NGINX_FILES + http + "}}\n")


NGINX_FILES = """  access_log off;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
"""

# nginx as a proxy, as benches/proxy.sh runs it: upstream keepalive, no buffering.
NGINX_HTTP = """  keepalive_requests 1000000;
  upstream emu {{ server 127.0.0.1:{emu}; keepalive 512; keepalive_requests 1000000; }}
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_buffering off;
  proxy_request_buffering off;
  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ proxy_pass http://emu; }} }}
"""


# With --tls-upstream: the proxying nginx reaches its upstream over TLS 1.3, verifying the
# certificate against the throwaway CA under the name the certificate carries, and resuming
# sessions on new connections (keepalive makes those rare).
NGINX_TLS_LOCATION = """location / {{
    proxy_pass https://emu;
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_name localhost;
    proxy_ssl_session_reuse on;
    proxy_ssl_protocols TLSv1.3;
  }}"""

# With --tls-upstream: the upstream itself, on the load core. TLS 1.3 only, h2 and http/1.1
# offered by ALPN (nginx 1.22 spells it `listen … ssl http2`; `http2 on;` from 1.25.1), one
# fixed ~1 KB chat completion for every request (`return` reads and discards the request
# body), no access log, connections kept for the whole run.
UPSTREAM_HTTP = """  keepalive_requests 1000000;
  keepalive_timeout 300s;
  ssl_protocols TLSv1.3;
  ssl_certificate {cert};
  ssl_certificate_key {key};
  ssl_session_cache shared:up:1m;
  server {{
    listen 127.0.0.1:{port} ssl {http2} backlog=4096;
    {http2_on}
    default_type application/json;
    location / {{ return 200 '{body}'; }}
  }}
"""

# What the TLS upstream answers: a chat completion shaped like the emulator's, ~1 KB.
COMPLETION = json.dumps({
    "id": "chatcmpl-bench-tls", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(
        ["The ticket reports duplicate invoices after the billing service retried a timed-out charge."]
        + ["Check the idempotency keys of the retried requests, void the duplicates, and add an alert."] * 7),
        "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 223, "completion_tokens": 160, "total_tokens": 383},
    "system_fingerprint": "fp_bench"}, separators=(",", ":"))


def nginx_version():
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def start_nginx(work, emu_port, port, label, ca=None):
    """nginx as benches/proxy.sh runs it (one worker, upstream keepalive, no buffering); its
    processes, master and worker, are what is measured. With `ca`, its upstream is TLS."""
    work = os.path.join(work, f"nginx-{label}")
    os.makedirs(work, exist_ok=True)
    conf = os.path.join(work, "nginx.conf")
    text = nginx_conf(NGINX_HTTP).format(work=work, emu=emu_port, port=port)
    if ca:
        plain = "location / { proxy_pass http://emu; }"
        text = text.replace(plain, NGINX_TLS_LOCATION.format(ca=ca))
    open(conf, "w").write(text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen(pin(0) + [nginx, "-p", work, "-e", os.path.join(work, "nginx-error.log"), "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_tls_upstream(work, certs, port):
    """The nginx TLS upstream (see UPSTREAM_HTTP), pinned to the load core."""
    work = os.path.join(work, "upstream")
    os.makedirs(work, exist_ok=True)
    new = nginx_version() >= (1, 25, 1)
    conf = os.path.join(work, "nginx.conf")
    if "'" in COMPLETION or "$" in COMPLETION or "\\" in COMPLETION:
        sys.exit("ab.py: the upstream's completion cannot be written into nginx's config")
    open(conf, "w").write(nginx_conf(UPSTREAM_HTTP).format(
        work=work, cert=certs["cert"], key=certs["key"], port=port, body=COMPLETION,
        http2="" if new else "http2", http2_on="http2 on;" if new else ""))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return subprocess.Popen(pin(1) + [nginx, "-p", work, "-e", os.path.join(work, "nginx-error.log"), "-c", conf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_certs(work):
    """A throwaway CA and a server certificate for localhost and 127.0.0.1, ECDSA P-256, made
    by openssl in `work` (removed with it). Returns the paths of ca, cert and key."""
    d = os.path.join(work, "tls")
    os.makedirs(d, mode=0o700)
    p = {k: os.path.join(d, f) for k, f in (("ca", "ca.pem"), ("ca_key", "ca.key"), ("csr", "server.csr"),
                                            ("cert", "server.pem"), ("key", "server.key"), ("ext", "server.ext"))}
    open(p["ext"], "w").write("subjectAltName = DNS:localhost, IP:127.0.0.1\n"
                              "basicConstraints = critical, CA:FALSE\n"
                              "keyUsage = critical, digitalSignature\n"
                              "extendedKeyUsage = serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for cmd in (["req", "-x509"] + ec + ["-keyout", p["ca_key"], "-out", p["ca"], "-days", "2",
                                         "-subj", "/CN=ezgate bench throwaway CA",
                                         "-addext", "basicConstraints = critical, CA:TRUE",
                                         "-addext", "keyUsage = critical, keyCertSign, cRLSign"],
                ["req"] + ec + ["-keyout", p["key"], "-out", p["csr"], "-subj", "/CN=localhost"],
                ["x509", "-req", "-in", p["csr"], "-CA", p["ca"], "-CAkey", p["ca_key"], "-CAcreateserial",
                 "-days", "2", "-out", p["cert"], "-extfile", p["ext"]]):
        r = subprocess.run(["openssl"] + cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"ab.py: openssl {cmd[0]} failed: {r.stderr.strip()}")
    return p


def with_ca_file(config, ca, out):
    """A copy of the ezgate config `config` (None: an empty one, i.e. ezgate's defaults) with `upstream.ca_file = ca`,
    under its [upstream] table, created when missing. The copy is checked by reading it back."""
    import tomllib
    text = open(config).read() if config else ""
    line = f"ca_file = {json.dumps(ca)}"
    lines = text.splitlines()
    at = next((i for i, l in enumerate(lines) if re.match(r"^\s*\[upstream\]\s*(#.*)?$", l)), None)
    if at is None:
        lines += ["", "[upstream]", line]
    else:
        end = next((i for i in range(at + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
        table = [l for l in lines[at + 1:end] if not re.match(r"^\s*ca_file\s*=", l)]
        lines = lines[:at + 1] + [line] + table + lines[end:]
    text = "\n".join(lines) + "\n"
    try:
        ok = tomllib.loads(text).get("upstream", {}).get("ca_file") == ca
    except tomllib.TOMLDecodeError as e:
        sys.exit(f"ab.py: {config}: cannot add upstream.ca_file: {e}")
    if not ok:
        sys.exit(f"ab.py: {config}: cannot add upstream.ca_file (is [upstream] written as an inline table?)")
    open(out, "w").write(text)
    return out


def wait_https(url, proc, ca):
    """wait_http over TLS, trusting only the throwaway CA."""
    import ssl
    ctx = ssl.create_default_context(cafile=ca)
    me = os.path.basename(sys.argv[0])
    for _ in range(150):
        if proc.poll() is not None:
            sys.exit(f"{me}: {proc.args[0]} exited: see its error log in the temp dir")
        try:
            urllib.request.urlopen(url, timeout=1, context=ctx).read()
            return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{me}: {url} did not answer")


def upstream_conns(pids, port):
    """Established TCP connections from the processes `pids` to 127.0.0.1:`port` (ss -tnp), or
    None without ss."""
    try:
        out = subprocess.run(["ss", "-Htnp", "state", "established", "dst", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None  # no ss (iproute2): the count is informative only
    return sum(1 for l in out.splitlines() if any(f"pid={p}," in l for p in pids))


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
    ap.add_argument("--tls-upstream", action="store_true",
                    help="TLS 1.3 between proxies and upstream (nginx upstream offering h2 and http/1.1; "
                         "with --load sse the emulator over TLS)")
    ap.add_argument("--json", help="append the results as one JSON line to this file (benches/proxy.sh reads it)")
    ap.add_argument("--label", default="ab", help="the `target` of that JSON line")
    ap.add_argument("--emu-quota", help="the emulator's --quota (e.g. requests=1000000000/1m): "
                    "every answer then carries the six x-ratelimit-* headers")
    args = ap.parse_args()
    # A SIGTERM (proxy.sh's `timeout`) unwinds through the `finally` below like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not 1 <= args.rounds <= 50 or not 1 <= args.secs <= 30 or not 0 <= args.rate <= 5000:
        sys.exit("ab.py: --rounds 1..50, --secs 1..30 and --rate 0..5000")
    if args.tls_upstream and args.emu_quota and args.load == "chat":
        sys.exit("ab.py: --emu-quota needs the emulator; with --tls-upstream it is the upstream only with --load sse")
    if args.tls_upstream and not shutil.which("openssl"):
        sys.exit("ab.py: --tls-upstream needs openssl (apt-get install openssl)")

    work = subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip()
    body = os.path.join(work, "body.json")
    subprocess.run([sys.executable, os.path.join(ROOT, "benches/bench_client.py"), "body", body], check=True)
    bare = os.path.join(work, "bare.toml")
    open(bare, "w").write("[log]\naccess_log = false\n")

    procs = []
    try:
        emu_port = free_port()
        quota = ["--quota", args.emu_quota] if args.emu_quota else []
        certs = make_certs(work) if args.tls_upstream else None
        scheme = "https" if certs else "http"
        if certs and args.load == "chat":
            emu = start_tls_upstream(work, certs, emu_port)
        else:
            tls = ["--tls-cert", certs["cert"], "--tls-key", certs["key"]] if certs else []
            emu = subprocess.Popen(pin(1) + [os.path.join(ROOT, "target/release/ezlink-emulator"),
                                             "--listen", f"127.0.0.1:{emu_port}"] + tls + quota,
                                   stdout=subprocess.DEVNULL)
        procs.append(emu)
        if certs:
            wait_https(f"https://localhost:{emu_port}/v1/models", emu, certs["ca"])
            print(f"upstream: {'nginx' if args.load == 'chat' else 'the emulator'} over TLS 1.3 on "
                  f"127.0.0.1:{emu_port} (ALPN h2, http/1.1); CA {certs['ca']}")
        else:
            wait_http(f"http://127.0.0.1:{emu_port}/v1/models", emu)
        gates, admins = [], {}
        for label, binary, config in (("A", args.a, args.config_a), ("B", args.b, args.config_b)):
            port, admin = free_port(), free_port()
            if binary == "nginx":
                p = start_nginx(work, emu_port, port, label, certs["ca"] if certs else None)
                procs.append(p)
                wait_http(f"http://127.0.0.1:{port}/v1/models", p)
                worker = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
                gates.append((label, port, [p.pid] + [int(w) for w in worker]))
                admins[label] = None
                continue
            if certs:
                # As shipped: the access log is whatever the config says (on by default), and
                # goes to a file, as a service manager's journal or a redirect would take it.
                config = with_ca_file(config, certs["ca"], os.path.join(work, f"ezgate-{label}.toml"))
                log = open(os.path.join(work, f"ezgate-{label}.log"), "wb")
            else:
                log = subprocess.DEVNULL
            p = subprocess.Popen(pin(0) + [binary, "--config", config or bare, "--listen", f"127.0.0.1:{port}",
                                           "--admin-listen", f"127.0.0.1:{admin}",
                                           "--upstream", f"{scheme}://127.0.0.1:{emu_port}"],
                                 stdout=log, stderr=log,
                                 env=dict(os.environ, MIMALLOC_ARENA_EAGER_COMMIT="0"))
            if certs:
                log.close()
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
        ratios, cpu, split = [], {"A": [], "B": []}, {"A": [], "B": []}
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
                scale = 1e6 / os.sysconf("SC_CLK_TCK") / j["requests"]
                after = ticks(pids)
                user, system = ((after[i] - before[label][i]) * scale for i in (0, 1))
                per[label] = user + system
                split[label].append((user, system))
            for label in per:
                cpu[label].append(per[label])
            ratios.append(per["B"] / per["A"])
        print(f"B/A CPU per request: median {statistics.median(ratios):.3f}; rounds "
              + " ".join(f"{x:.3f}" for x in ratios))
        for label in ("A", "B"):
            print(f"{label}: median {statistics.median(cpu[label]):.1f} µs; rounds "
                  + " ".join(f"{x:.1f}" for x in cpu[label])
                  + f" (user {statistics.median(u for u, _ in split[label]):.1f}, system "
                  + f"{statistics.median(s for _, s in split[label]):.1f}: medians of each)")

        # Which protocol the upstream connections speak shows in how many there are, counted
        # while the load's connections are still warm (the idle ones are swept later).
        conns = {label: upstream_conns(pids, emu_port) for label, _, pids in gates} if certs else None
        result = {"phase": "ab", "target": args.label, "a": args.a, "b": args.b, "config_a": args.config_a,
                  "config_b": args.config_b, "load": args.load, "tls_upstream": args.tls_upstream,
                  "rounds": args.rounds, "secs": args.secs, "ratio": statistics.median(ratios), "ratios": ratios,
                  "cpu_us": {k: statistics.median(v) for k, v in cpu.items()},
                  "user_us": {k: statistics.median(u for u, _ in v) for k, v in split.items()},
                  "system_us": {k: statistics.median(s for _, s in v) for k, v in split.items()}, "rate": args.rate,
                  "upstream_conns": conns}
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
            result["latency_us"] = {k: {q: statistics.median(v[q]) for q in v} for k, v in lat.items()}
            for label in ("A", "B"):
                q = lat[label]
                print(f"{label} at {args.rate} req/s: p50 median {statistics.median(q['p50']):.0f} µs, "
                      f"p99 median {statistics.median(q['p99']):.0f} µs; rounds p50 "
                      + " ".join(f"{x:.0f}" for x in q["p50"]) + "; p99 " + " ".join(f"{x:.0f}" for x in q["p99"]))

        if certs:
            for label in ("A", "B"):
                print(f"{label}: {result['upstream_conns'][label]} connections open to the upstream after the "
                      "CPU rounds (h2 shares a few; HTTP/1.1 holds one per request in flight, 32 here)")
            for label in admins:
                path = os.path.join(work, f"ezgate-{label}.log")
                if admins[label] is not None and os.path.exists(path):
                    print(f"{label}: {os.path.getsize(path) / 1e6:.1f} MB written to its log file")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
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
