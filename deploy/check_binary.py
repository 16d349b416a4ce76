#!/usr/bin/env python3
"""Runs the ezgate binary the image would hold the way the deploy kit runs it.

    check_binary.py BINARY --out DIR [--promtool PATH]

Only loopback addresses are used. Checks, in order:
  1. `ezgate --version` works;
  2. `ezgate check-config` accepts deploy/config/ezgate.toml and the Kubernetes ezgate.toml
     with EZLINK_API_KEY set, and never prints the key;
  3. without EZLINK_API_KEY it refuses that config (exit non-zero) — the image relies on it;
  4. started as the image starts it (EZGATE_CONFIG / EZGATE_LISTEN / EZGATE_ADMIN_LISTEN from
     the environment), /healthz and /readyz answer 200 on the admin port (the probes);
  5. a request to an unreachable upstream gives a JSON 502, counted in /metrics; the scrape
     holds only series the dashboard checker knows (check_dashboard.py --exposition logic)
     and, with promtool, passes `promtool check metrics`;
  6. SIGHUP leaves it serving; SIGTERM makes it exit 0 within shutdown_grace.
Writes the scrape to DIR/metrics.txt. Exit 1 with a line per failure.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
sys.path.insert(0, str(DEPLOY))
import check_dashboard  # noqa: E402

KEY = "ezgate-deploy-check-not-a-real-key-0123456789"
# Loopback only: never through an http_proxy from the environment.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"content-type": "application/json"} if body else {})
    try:
        with NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--promtool")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("EZGATE_", "EZLINK_"))}
    exe = str(a.binary.resolve())
    configs = [DEPLOY / "config" / "ezgate.toml", DEPLOY / "kubernetes" / "base" / "ezgate.toml"]

    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=base_env, timeout=30)
    if r.returncode != 0:
        errors.append(f"ezgate --version exited {r.returncode}: {r.stderr.strip()[:300]}")

    for cfg in configs:
        r = subprocess.run([exe, "check-config", "--config", str(cfg)], capture_output=True, text=True,
                           env={**base_env, "EZLINK_API_KEY": KEY}, timeout=30)
        if r.returncode != 0:
            errors.append(f"check-config rejects {cfg.relative_to(DEPLOY.parent)}: {(r.stderr or r.stdout).strip()[:500]}")
        if KEY in r.stdout + r.stderr:
            errors.append(f"check-config printed the API key for {cfg.name} (must be redacted)")
    r = subprocess.run([exe, "check-config", "--config", str(configs[0])], capture_output=True, text=True,
                       env=base_env, timeout=30)
    if r.returncode == 0:
        errors.append("check-config accepts the image's config without EZLINK_API_KEY set")

    # Start it the way the image does: everything from the environment.
    proxy, admin, dead = free_port(), free_port(), free_port()
    env = {**base_env, "EZLINK_API_KEY": KEY, "EZGATE_CONFIG": str(configs[0]),
           "EZGATE_LISTEN": f"127.0.0.1:{proxy}", "EZGATE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
           "EZGATE_UPSTREAM": f"http://127.0.0.1:{dead}"}
    log = open(a.out / "ezgate.log", "wb")
    p = subprocess.Popen([exe], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        up = False
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if http("GET", f"http://127.0.0.1:{admin}/healthz", timeout=1)[0] == 200:
                    up = True
                    break
            except OSError:
                pass
            time.sleep(0.1)
        if not up:
            errors.append(f"/healthz on the admin port did not answer 200 within 15s "
                          f"(exit {p.poll()}; log {a.out / 'ezgate.log'})")
            return report(errors)
        st, _, _ = http("GET", f"http://127.0.0.1:{admin}/readyz")
        if st != 200:
            errors.append(f"/readyz answered {st}, want 200 (the readiness probe)")
        try:
            st, _, body = http("POST", f"http://127.0.0.1:{proxy}/v1/chat/completions",
                               json.dumps({"model": "gpt-4o-mini", "messages": []}).encode(), timeout=30)
        except OSError as ex:
            st, body = 0, str(ex).encode()
        try:
            err = json.loads(body)["error"]
            if st != 502 or err.get("source") != "gateway" or err.get("code") != "upstream_unreachable":
                errors.append(f"unreachable upstream: got {st} {err.get('source')}/{err.get('code')}, "
                              "want 502 gateway/upstream_unreachable")
        except (ValueError, KeyError, TypeError):
            errors.append(f"unreachable upstream: {st} with a body that is not the JSON error schema: {body[:200]!r}")
        st, _, text = http("GET", f"http://127.0.0.1:{admin}/metrics")
        scrape = a.out / "metrics.txt"
        scrape.write_bytes(text)
        if st != 200:
            errors.append(f"/metrics answered {st}")
        lines = text.decode(errors="replace")
        for want in ('ezgate_requests_total{', 'status="502"', 'ezgate_gateway_errors_total{code="upstream_unreachable"}'):
            if want not in lines:
                errors.append(f"/metrics lacks {want} after a 502")
        check_dashboard.check_exposition(scrape, errors)
        if a.promtool:
            try:
                r = subprocess.run([a.promtool, "check", "metrics"], input=text, capture_output=True)
                if r.returncode != 0:
                    errors.append(f"promtool check metrics: {(r.stdout + r.stderr).decode().strip()[:500]}")
            except OSError as ex:
                errors.append(f"promtool check metrics: cannot run {a.promtool}: {ex}")
        p.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        if p.poll() is not None or http("GET", f"http://127.0.0.1:{admin}/healthz")[0] != 200:
            errors.append("after SIGHUP (reload) ezgate stopped serving")
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=35)
            if rc != 0:
                errors.append(f"SIGTERM: exit status {rc}, want 0")
        except subprocess.TimeoutExpired:
            errors.append("SIGTERM: still running after shutdown_grace (30s) + 5s")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    return report(errors)


def report(errors: list[str]) -> int:
    for e in errors:
        print(f"  ERROR {e}", file=sys.stderr)
    print(f"  ran the binary through the checks above: {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
