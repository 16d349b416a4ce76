#!/usr/bin/env python3
"""Load clients for benches/proxy.sh that wrk and oha do not cover. Standard library only.

  sse-delay  S streams at once, each E events I ms apart, from benches/sse_origin.py (which
             stamps each event with CLOCK_MONOTONIC ns at write time); the arrival stamp is
             taken in data_received, before any parsing. Prints the per-event one-way delay
             quantiles in microseconds.
  hold       opens N SSE streams at once (slow ones: long interval), waits until every one
             has its 200 response headers, then samples VmRSS of the given pids while all are
             open, then closes them all. Prints the peak of those samples.
  rate       an open-loop fixed-rate load (a fallback when oha is missing): request k is due
             at start + k/rate; its latency is measured from that due time, not from when a
             connection was free to send it (coordinated-omission correction, as wrk2/oha do).

Every mode is bounded in count and in time (--timeout) and exits non-zero when any request
fails (connect error, non-200, short stream). Output: one JSON object on stdout.
"""

import argparse
import asyncio
import gc
import json
import re
import resource
import sys
import time

T_NS_RE = re.compile(rb'"t_ns":(\d+)')


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def quantiles(values, qs=(0.5, 0.9, 0.99, 0.999)):
    if not values:
        return {}
    v = sorted(values)
    out = {}
    for q in qs:
        idx = min(len(v) - 1, max(0, int(round(q * len(v) + 0.5)) - 1))
        out["p" + ("%g" % (q * 100))] = v[idx]
    out["max"] = v[-1]
    out["mean"] = sum(v) / len(v)
    return out


class Response:
    """Incremental HTTP/1.1 response parser: Content-Length, chunked, or read-to-close."""

    def __init__(self):
        self.buf = b""
        self.status = None
        self.chunked = False
        self.remaining = None  # bytes of body left (content-length) or of current chunk
        self.done = False
        self.body = b""
        self.close_delimited = False
        self.cstate = "size"

    def feed(self, data: bytes) -> bytes:
        """Feeds bytes; returns newly decoded body bytes. Sets .status and .done."""
        self.buf += data
        out = b""
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split()[1])
            hdrs = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                hdrs[k.strip().lower()] = v.strip().lower()
            if b"chunked" in hdrs.get(b"transfer-encoding", b""):
                self.chunked = True
            elif b"content-length" in hdrs:
                self.remaining = int(hdrs[b"content-length"])
                if self.remaining == 0:
                    self.done = True
            else:
                self.close_delimited = True
        if self.chunked:
            while not self.done:
                if self.cstate == "size":
                    nl = self.buf.find(b"\r\n")
                    if nl < 0:
                        break
                    size = int(self.buf[:nl].split(b";")[0], 16)
                    self.buf = self.buf[nl + 2:]
                    self.cstate, self.remaining = ("trailer", 0) if size == 0 else ("data", size)
                elif self.cstate == "data":
                    if not self.buf:
                        break
                    take = min(len(self.buf), self.remaining)
                    out += self.buf[:take]
                    self.buf = self.buf[take:]
                    self.remaining -= take
                    if self.remaining == 0:
                        self.cstate = "crlf"
                elif self.cstate == "crlf":
                    if len(self.buf) < 2:
                        break
                    self.buf = self.buf[2:]
                    self.cstate = "size"
                else:  # trailer section: lines until an empty one
                    nl = self.buf.find(b"\r\n")
                    if nl < 0:
                        break
                    line, self.buf = self.buf[:nl], self.buf[nl + 2:]
                    if not line:
                        self.done = True
        elif self.remaining is not None and not self.done:
            take = min(len(self.buf), self.remaining)
            out, self.buf = self.buf[:take], self.buf[take:]
            self.remaining -= take
            if self.remaining == 0:
                self.done = True
        elif self.close_delimited:
            out, self.buf = self.buf, b""
        return out


def parse_hostport(s: str):
    s = s.replace("http://", "").rstrip("/")
    host, port = s.rsplit(":", 1)
    return host, int(port)


def stream_request(host: str, port: int, events: int, interval_ms: int) -> bytes:
    body = json.dumps({"model": "gpt-4o-mini", "stream": True,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer sk-bench-0000000000000000\r\naccept: text/event-stream\r\n"
            b"x-emu-stream-events: %d\r\nx-emu-stream-interval-ms: %d\r\ncontent-length: %d\r\n\r\n%s"
            % (host.encode(), port, events, interval_ms, len(body), body))


class SseStream(asyncio.Protocol):
    """One SSE request on its own connection; records per-event delays (t_ns) if present."""

    def __init__(self, request: bytes, delays: list, record: bool):
        self.request = request
        self.resp = Response()
        self.pending = b""
        self.delays = delays
        self.record = record
        self.events = 0
        self.saw_done = False
        self.headers = asyncio.get_running_loop().create_future()
        self.finished = asyncio.get_running_loop().create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data):
        ts = time.monotonic_ns()
        try:
            body = self.resp.feed(data)
        except (ValueError, IndexError) as e:
            self._finish(e)
            return
        if self.resp.status is not None and not self.headers.done():
            self.headers.set_result(self.resp.status)
        if body:
            self.pending += body
            while True:
                i = self.pending.find(b"\n\n")
                if i < 0:
                    break
                ev, self.pending = self.pending[:i], self.pending[i + 2:]
                if ev.startswith(b"data: [DONE]"):
                    self.saw_done = True
                    continue
                self.events += 1
                if self.record:
                    m = T_NS_RE.search(ev)
                    if m:
                        self.delays.append((ts - int(m.group(1))) / 1000.0)
        if self.resp.done:
            self._finish(None)

    def connection_lost(self, exc):
        if not self.headers.done():
            self.headers.set_result(None)
        self._finish(exc or EOFError("connection closed"))

    def _finish(self, exc):
        if not self.finished.done():
            self.finished.set_result(exc)


async def cmd_sse_delay(a) -> int:
    loop = asyncio.get_running_loop()
    host, port = parse_hostport(a.url)
    delays, errors = [], []
    req = stream_request(host, port, a.events, a.interval_ms)

    async def one(i):
        await asyncio.sleep(i * a.interval_ms / 1000.0 / a.streams)  # spread the event times
        try:
            _, p = await loop.create_connection(lambda: SseStream(req, delays, True), host, port)
        except OSError as e:
            errors.append(f"connect: {e}")
            return
        status = await p.headers
        exc = await p.finished
        p.transport.close()
        if status != 200:
            errors.append(f"status {status}")
        elif p.events != a.events or not p.saw_done:
            errors.append(f"stream ended after {p.events}/{a.events} events (done={p.saw_done}, {exc})")

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(a.streams))), a.timeout)
    except asyncio.TimeoutError:
        errors.append(f"timed out after {a.timeout}s")
    expected = a.streams * a.events
    if len(delays) != expected and not errors:
        errors.append(f"{len(delays)} of {expected} events carried a t_ns stamp (origin is not sse_origin.py?)")
    print(json.dumps({"mode": "sse-delay", "streams": a.streams, "events": len(delays),
                      "expected_events": expected, "delay_us": quantiles(delays),
                      "errors": errors[:5], "error_count": len(errors)}))
    return 1 if errors else 0


def read_rss_kb(pids):
    rss = hwm = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
    return rss, hwm


async def cmd_hold(a) -> int:
    raise_nofile()
    loop = asyncio.get_running_loop()
    host, port = parse_hostport(a.url)
    pids = [int(p) for p in a.pids.split(",") if p]
    req = stream_request(host, port, a.events, a.interval_ms)
    sem = asyncio.Semaphore(a.connect_concurrency)
    protos, errors = [], []
    t0 = time.monotonic()
    deadline = t0 + a.timeout

    async def one():
        async with sem:
            try:
                _, p = await loop.create_connection(lambda: SseStream(req, [], False), host, port)
            except OSError as e:
                errors.append(f"connect: {e}")
                return
            protos.append(p)
            status = await p.headers  # keeps the connect rate bounded by the proxy's answers
            if status != 200:
                errors.append(f"status {status}")

    # Open the streams in steps and sample the proxy's RSS after each: the points give the
    # memory per open stream (a least-squares slope), used to extrapolate to --target-n when
    # the open-file limit allows fewer streams than that.
    points = [(0, read_rss_kb(pids)[0] if pids else None)]
    steps = max(1, a.steps)
    opened = 0
    for k in range(1, steps + 1):
        batch = a.n * k // steps - opened
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(one() for _ in range(batch))), max(0.1, remaining))
        except asyncio.TimeoutError:
            errors.append(f"not all {a.n} streams answered within {a.timeout}s")
        opened += batch
        if errors:
            break
        await asyncio.sleep(0.3)
        if pids:
            points.append((opened, read_rss_kb(pids)[0]))
    opened_s = time.monotonic() - t0
    # Every stream now has its 200 headers; check they are still open, then sample RSS.
    samples = []
    end = min(deadline + 5, time.monotonic() + a.hold_s)
    while time.monotonic() < end and pids:
        samples.append(read_rss_kb(pids))
        await asyncio.sleep(0.25)
    open_now = sum(1 for p in protos if not p.finished.done())
    if open_now < a.n and not errors:
        errors.append(f"only {open_now} of {a.n} streams still open while sampling (interval too short?)")
    for p in protos:
        if p.transport is not None:
            p.transport.abort()
    rss = max((s[0] for s in samples), default=0) if pids else None
    hwm = max((s[1] for s in samples), default=0) if pids else None
    slope = None
    if pids and len(points) >= 3:
        xs, ys = [p[0] for p in points[1:]], [p[1] for p in points[1:]]  # without the idle point
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None
    at_target = None
    if rss is not None:
        at_target = rss if a.n >= a.target_n or slope is None else rss + slope * (a.target_n - a.n)
    print(json.dumps({"mode": "hold", "streams": a.n, "ok": sum(1 for p in protos if p.resp.status == 200),
                      "open_while_sampling": open_now, "open_seconds": round(opened_s, 2),
                      "rss_kb": rss, "hwm_kb": hwm, "points": points, "kib_per_stream": slope,
                      "target_n": a.target_n, "rss_at_target_kb": at_target,
                      "extrapolated": bool(rss is not None and a.n < a.target_n),
                      "errors": errors[:5], "error_count": len(errors)}))
    return 1 if errors else 0


class RateConn(asyncio.Protocol):
    def __init__(self, owner):
        self.owner = owner
        self.transport = None
        self.resp = None
        self.due = None
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def send(self, request: bytes, due: float):
        self.resp = Response()
        self.due = due
        self.transport.write(request)

    def data_received(self, data):
        try:
            self.resp.feed(data)
        except (ValueError, IndexError):
            self.owner.done(self, None)
            return
        if self.resp.done:
            self.owner.done(self, self.resp.status)

    def connection_lost(self, exc):
        self.lost = True
        if self.due is not None:
            self.owner.done(self, None)


class RateRunner:
    def __init__(self, request: bytes, total: int):
        self.request = request
        self.idle = []
        self.queue = []  # due times waiting for a free connection
        self.lat = []
        self.statuses = {}
        self.total = total
        self.finished = asyncio.get_running_loop().create_future()

    def submit(self, due: float):
        if self.idle:
            self.idle.pop().send(self.request, due)
        else:
            self.queue.append(due)

    def done(self, conn: RateConn, status):
        now = time.perf_counter()
        self.lat.append((now - conn.due) * 1e6)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        conn.due = None
        if not conn.lost and status is not None:
            if self.queue:
                conn.send(self.request, self.queue.pop(0))
            else:
                self.idle.append(conn)
        if len(self.lat) >= self.total and not self.finished.done():
            self.finished.set_result(None)


async def cmd_rate(a) -> int:
    loop = asyncio.get_running_loop()
    host, port = parse_hostport(a.url)
    with open(a.body_file, "rb") as f:
        body = f.read()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
               b"authorization: Bearer sk-bench-0000000000000000\r\ncontent-length: %d\r\n\r\n%s"
               % (host.encode(), port, len(body), body))
    total = int(a.rate * a.duration)
    runner = RateRunner(request, total)
    for _ in range(a.conns):
        _, c = await loop.create_connection(lambda: RateConn(runner), host, port)
        runner.idle.append(c)
    start = time.perf_counter()
    errors = []
    k = 0
    try:
        while k < total:
            now = time.perf_counter()
            due = start + k / a.rate
            if due > now:
                await asyncio.sleep(due - now)
                continue
            while k < total and start + k / a.rate <= now:
                runner.submit(start + k / a.rate)
                k += 1
            await asyncio.sleep(0)
        await asyncio.wait_for(runner.finished, a.timeout)
    except asyncio.TimeoutError:
        errors.append(f"timed out: {len(runner.lat)} of {total} answered")
    elapsed = time.perf_counter() - start
    non200 = sum(n for s, n in runner.statuses.items() if s != 200)
    if non200:
        errors.append(f"{non200} responses were not 200: {runner.statuses}")
    print(json.dumps({"mode": "rate", "requests": len(runner.lat), "rate": a.rate, "elapsed_s": round(elapsed, 3),
                      "latency_us": quantiles(runner.lat), "errors": errors[:5], "error_count": len(errors)}))
    return 1 if errors else 0


def cmd_oha_json(a) -> int:
    """Reads oha's --output-format json on stdin; prints this file's rate-mode JSON shape."""
    raw = sys.stdin.read()
    try:
        d = json.loads(raw[raw.index("{"):])
    except ValueError:
        print(json.dumps({"error": "oha printed no JSON", "output": raw[-500:]}))
        return 1
    pct = d.get("latencyPercentiles", {})
    statuses = {str(k): v for k, v in d.get("statusCodeDistribution", {}).items()}
    errors = d.get("errorDistribution", {})
    count = sum(statuses.values())
    problems = []
    if errors:
        problems.append(f"errors: {errors}")
    if set(statuses) - {"200"}:
        problems.append(f"non-200 answers: {statuses}")
    if count < a.expected:
        problems.append(f"{count} of {a.expected} requests answered")
    lat = {k: (v * 1e6 if v is not None else None) for k, v in pct.items() if k in ("p50", "p90", "p99", "p99.9")}
    s = d.get("summary", {})
    lat["max"] = s.get("slowest", 0) * 1e6
    lat["mean"] = s.get("average", 0) * 1e6
    print(json.dumps({"mode": "rate", "tool": "oha", "requests": count, "rate_achieved": s.get("requestsPerSec"),
                      "latency_us": lat, "errors": problems[:5], "error_count": len(problems)}))
    return 1 if problems else 0


def cmd_show(a) -> int:
    """One progress line for proxy.sh's log; for wrk summaries also the pass/fail check."""
    d = json.loads(a.json)
    t = a.target
    if a.kind == "wrk":
        bad = sum(d["errors"].values())
        if bad or not d["requests"]:
            print(f"{t}: {bad} failed requests (non-2xx/3xx or socket errors) of {d['requests']}: {d['errors']}")
            return 1
        print(f"  {t:<16} {d['requests'] / d['duration_us'] * 1e6:>9,.0f} req/s")
    elif a.kind == "lat":
        q = d["latency_us"]
        print(f"  {t:<16} p50 {q['p50']:>7,.0f} us  p99 {q['p99']:>7,.0f} us  p99.9 {q['p99.9']:>7,.0f} us")
    elif a.kind == "sse":
        q = d["delay_us"]
        print(f"  {t:<16} per-event delay p50 {q['p50']:>6,.0f} us  p99 {q['p99']:>6,.0f} us  ({d['events']} events)")
    elif a.kind == "hold":
        r = d.get("rss_kb")
        rss = "(no proxy)" if r is None else f"{r / 1024:.1f} MiB"
        extra = ""
        if d.get("kib_per_stream") is not None:
            extra = f", {d['kib_per_stream']:.1f} KiB per stream"
            if d.get("extrapolated"):
                extra += f" -> {d['rss_at_target_kb'] / 1024:.1f} MiB at {d['target_n']:,} (extrapolated)"
        print(f"  {t:<16} {d['ok']} streams open in {d['open_seconds']} s; proxy RSS {rss}{extra}")
    return 0


def cmd_body(a) -> int:
    """Writes the benchmark's request: a ~1 KB chat completion (the size of a short prompt)."""
    msg = {"model": "gpt-4o-mini", "max_tokens": 64, "temperature": 0.2, "messages": [
        {"role": "system", "content": "You are a concise assistant for an internal support tool."},
        {"role": "user", "content": ""}]}
    base = len(json.dumps(msg, separators=(",", ":")))
    words = ("please summarise the following ticket and suggest the next step for the on-call "
             "engineer who owns the billing service ") * 20
    msg["messages"][1]["content"] = words[: 1024 - base].rstrip()
    body = json.dumps(msg, separators=(",", ":"))
    with open(a.file, "w") as f:
        f.write(body + " " * (1024 - len(body)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sse-delay")
    s.add_argument("--url", required=True)
    s.add_argument("--streams", type=int, default=50)
    s.add_argument("--events", type=int, default=100)
    s.add_argument("--interval-ms", type=int, default=20)
    s.add_argument("--timeout", type=float, default=60)
    h = sub.add_parser("hold")
    h.add_argument("--url", required=True)
    h.add_argument("--n", type=int, default=10000)
    h.add_argument("--events", type=int, default=2)
    h.add_argument("--interval-ms", type=int, default=120000)
    h.add_argument("--connect-concurrency", type=int, default=256)
    h.add_argument("--pids", default="")
    h.add_argument("--hold-s", type=float, default=2.0)
    h.add_argument("--steps", type=int, default=4)
    h.add_argument("--target-n", type=int, default=10000)
    h.add_argument("--timeout", type=float, default=60)
    r = sub.add_parser("rate")
    r.add_argument("--url", required=True)
    r.add_argument("--rate", type=float, default=1000)
    r.add_argument("--duration", type=float, default=10)
    r.add_argument("--conns", type=int, default=32)
    r.add_argument("--body-file", required=True)
    r.add_argument("--timeout", type=float, default=30)
    b = sub.add_parser("body")
    b.add_argument("file")
    o = sub.add_parser("oha-json")
    o.add_argument("expected", type=int)
    w = sub.add_parser("show")
    w.add_argument("kind", choices=["wrk", "lat", "sse", "hold"])
    w.add_argument("json")
    w.add_argument("target")
    a = ap.parse_args()
    if a.cmd == "body":
        return cmd_body(a)
    if a.cmd == "oha-json":
        return cmd_oha_json(a)
    if a.cmd == "show":
        return cmd_show(a)
    gc.disable()  # no collector pauses inside the timed loops (the runs are short and bounded)
    fn = {"sse-delay": cmd_sse_delay, "hold": cmd_hold, "rate": cmd_rate}[a.cmd]
    return asyncio.run(fn(a))


if __name__ == "__main__":
    sys.exit(main())
