#!/usr/bin/env python3
"""Turns the results.jsonl written by benches/proxy.sh into the comparison table.

Each number is the median over the rounds of that measurement (3 rounds in a full run, 1
in --quick). "added" rows subtract the direct (no proxy) median from the proxy's median.
Targets are judged (met / MISSED) only for a release build of ezgate: the smoke run's debug
build is several times slower, and its verdicts would say nothing.
Usage: report.py RESULTS.jsonl [--markdown OUT.md] [--json OUT.json]
Exit status: 0; 3 if --strict and a target is missed.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "ezgate"]


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    ap.add_argument("--strict", action="store_true")
    a = ap.parse_args()
    rows = load(a.results)
    meta = next((r for r in rows if r["phase"] == "meta"), {})
    by = defaultdict(list)
    for r in rows:
        by[(r["phase"], r.get("target"))].append(r)

    def tput(t):
        return med([r["requests"] / (r["duration_us"] / 1e6) for r in by[("tput", t)]])

    def cpu_us(phase, t):
        vals = [r["cpu_ticks"] / r["clk_tck"] * 1e6 / r["requests"] for r in by[(phase, t)]
                if r.get("cpu_ticks") is not None and r["requests"]]
        return med(vals)

    def lat(t, key, phase="lat"):
        return med([r["latency_us"].get(key) for r in by[(phase, t)]])

    def busy(t):  # share of the proxy's core the proxy used during the max-throughput runs
        return med([r["cpu_ticks"] / r["clk_tck"] / (r["duration_us"] / 1e6) * 100 for r in by[("tput", t)]
                    if r.get("cpu_ticks") is not None])

    def sse(t, key):
        return med([r["delay_us"].get(key) for r in by[("sse", t)]])

    def hold_mib(t):
        v = [(r.get("rss_at_target_kb") or r["rss_kb"]) / 1024 for r in by[("hold", t)] if r.get("rss_kb") is not None]
        return med(v)

    def hold_measured_mib(t):
        return med([r["rss_kb"] / 1024 for r in by[("hold", t)] if r.get("rss_kb") is not None])

    def per_stream_kib(t):
        return med([r.get("kib_per_stream") for r in by[("hold", t)]])

    def hwm_mib(t):
        return med([r["hwm_kb"] / 1024 for r in by[("mem", t)]])

    def runs(t, key, phase="lat", field="latency_us"):
        return [r[field].get(key) for r in by[(phase, t)]]

    def added(f, t):
        p, d = f(t), f("direct")
        return None if p is None or d is None else p - d

    lines = []  # (label, direct, nginx, ezgate, target_text, verdict)
    summary = {}
    # Results files written before the profile was recorded came from release builds.
    profile = meta.get("profile", "release")
    judged = profile == "release"

    def verdict_of(ok):
        return "" if ok is None or not judged else ("met" if ok else "MISSED")

    def row(label, vals, fmt, target="", ok=None, ratios=True, key=None):
        d, n, e = vals
        r_d = e / d if ratios and e is not None and d not in (None, 0) else None
        r_n = e / n if ratios and e is not None and n not in (None, 0) else None
        verdict = verdict_of(ok)
        lines.append((label, [fmt(x) for x in (d, n, e)], fmt_ratio(r_d), fmt_ratio(r_n), target, verdict))
        if key:
            summary[key] = {"direct": d, "nginx": n, "ezgate": e, "ezgate/direct": r_d, "ezgate/nginx": r_n,
                            "target": target, "verdict": verdict or None}

    def fmt_ratio(x):
        return "" if x is None else f"{x:.2f}"

    def f0(x):
        return "—" if x is None else f"{x:,.0f}"

    def f1(x):
        return "—" if x is None else f"{x:,.1f}"

    tp = [tput(t) for t in TARGETS]
    row("throughput, req/s (wrk, max)", tp, f0, "ezgate ≥ nginx",
        None if tp[1] is None or tp[2] is None else tp[2] >= tp[1], key="throughput_rps")
    cpu = [None, cpu_us("tput", "nginx"), cpu_us("tput", "ezgate")]
    row("proxy CPU µs/request at max", cpu, f1, "ezgate ≤ nginx",
        None if None in cpu[1:] else cpu[2] <= cpu[1], key="cpu_us_per_req_max")
    bz = [None, busy("nginx"), busy("ezgate")]
    row("  proxy core busy during those runs, %", bz, f0, ratios=False, key="proxy_core_busy_pct")
    cap = [None] + [None if c is None else 1e6 / c for c in cpu[1:]]
    row("  requests per proxy core-second (1e6 / CPU µs)", cap, f0, key="req_per_core_second")
    cpu1k = [None, cpu_us("lat", "nginx"), cpu_us("lat", "ezgate")]
    row(f"proxy CPU µs/request at {meta.get('rate', 1000):,} req/s", cpu1k, f1, "", key="cpu_us_per_req_fixed_rate")
    for key, label in (("p50", "p50"), ("p99", "p99"), ("p99.9", "p99.9")):
        row(f"latency {label} at {meta.get('rate', 1000):,} req/s, µs", [lat(t, key) for t in TARGETS], f0,
            key=f"latency_{label}_us")
    add99 = [None, added(lambda t: lat(t, "p99"), "nginx"), added(lambda t: lat(t, "p99"), "ezgate")]
    row("  p99 added vs direct, µs", add99, f0, "ezgate ≤ 250", None if add99[2] is None else add99[2] <= 250,
        ratios=False, key="latency_p99_added_us")
    add50 = [None, added(lambda t: lat(t, "p50"), "nginx"), added(lambda t: lat(t, "p50"), "ezgate")]
    row("  p50 added vs direct, µs", add50, f0, ratios=False, key="latency_p50_added_us")
    hw = [hwm_mib(t) for t in TARGETS]
    row("peak RSS (VmHWM) after request runs, MiB", hw, f1, key="vmhwm_mib")
    hold_n = meta.get("streams", 10000)
    measured_n = meta.get("streams_measured", hold_n)
    ho = [hold_mib(t) for t in TARGETS]
    if measured_n < hold_n:
        row(f"RSS with {measured_n:,} SSE streams open (measured), MiB", [hold_measured_mib(t) for t in TARGETS], f1,
            key="rss_streams_measured_mib")
    label = f"RSS with {hold_n:,} SSE streams open, MiB" + (" (extrapolated)" if measured_n < hold_n else "")
    row(label, ho, f1, "ezgate ≤ 150", None if ho[2] is None else ho[2] <= 150, key="rss_streams_mib")
    row("  memory per open SSE stream, KiB", [per_stream_kib(t) for t in TARGETS], f1, key="kib_per_stream")
    if by[("hold", "ezgate-h2")]:
        # How ezgate reaches EZLINK (TLS, ALPN h2): streams share upstream connections. nginx
        # cannot proxy to an HTTP/2 upstream, so its column stays the HTTP/1.1 figure.
        h2 = hold_mib("ezgate-h2")
        row("  the same, ezgate with an HTTP/2 upstream (h2c), MiB", [None, ho[1], h2], f1, "ezgate ≤ 150",
            None if h2 is None else h2 <= 150, key="rss_streams_h2_mib")
        row("    its memory per open SSE stream, KiB",
            [None, per_stream_kib("nginx"), per_stream_kib("ezgate-h2")], f1, key="kib_per_stream_h2")
    for key in ("p50", "p99"):
        row(f"SSE per-event delay {key}, µs", [sse(t, key) for t in TARGETS], f0, key=f"sse_delay_{key}_us")
    sadd = [None, added(lambda t: sse(t, "p99"), "nginx"), added(lambda t: sse(t, "p99"), "ezgate")]
    row("  SSE p99 added vs direct, µs", sadd, f0, "ezgate ≤ 1000", None if sadd[2] is None else sadd[2] <= 1000,
        ratios=False, key="sse_p99_added_us")

    bare = tp[2]
    extra = []
    for t, label, target in (("ezgate-policies", "ezgate + 3 rate-limit policies + /metrics scrapes", "≥ 0.90 of bare"),
                             ("ezgate-log", "ezgate + access log on (to /dev/null)", "")):
        v = tput(t)
        if v is None:
            continue
        ratio = v / bare if bare else None
        ok = None if not target or ratio is None else ratio >= 0.90
        c = cpu_us("tput", t)
        extra.append((label, v, c, ratio, target, verdict_of(ok)))
        summary[t] = {"throughput_rps": v, "cpu_us_per_req": c, "ratio_to_bare": ratio, "target": target or None,
                      "verdict": verdict_of(ok) or None}

    # Shared limits: the same policy local and in Redis (same run).
    shared = []
    for t, label in (("ezgate-local1", "ezgate + 1 request policy, local"), ("ezgate-redis", "ezgate + the same policy in Redis"),
                     ("ezgate-cluster", "ezgate + the same policy in a Redis Cluster (3 primaries)")):
        v = tput(t)
        if v is None:
            continue
        shared.append((label, v, cpu_us("tput", t), lat(t, "p50"), lat(t, "p99")))
        summary[t] = {"throughput_rps": v, "cpu_us_per_req": cpu_us("tput", t), "p50_us": lat(t, "p50"), "p99_us": lat(t, "p99")}

    # With a TLS upstream: memory per open stream (held here) and CPU per request against nginx
    # at the same moment (benches/ab.py --tls-upstream, "ab" lines).
    tls_mem = []
    for t, label in (("nginx-tls", "nginx (proxy_pass https://)"), ("ezgate-tls-h1", "ezgate, HTTP/1.1 upstream"),
                     ("ezgate-tls-h2", "ezgate, h2 upstream (http2 = \"auto\", ALPN)"),
                     ("ezgate-h2", "for comparison, the same run: ezgate over h2c to the plain upstream")):
        if by[("hold", t)] and by[("hold", "ezgate-tls-h2")]:
            tls_mem.append((label, hold_mib(t), per_stream_kib(t)))
            summary[f"{t}_streams"] = {"rss_mib": hold_mib(t), "kib_per_stream": per_stream_kib(t)}
    tls_cpu = []
    for t, label in (("tls-h1", "ezgate over HTTP/1.1 (benches/tls/h1.toml)"),
                     ("tls-auto", "ezgate as shipped, http2 = \"auto\": h2 (benches/tls/auto.toml)")):
        for r in by[("ab", t)]:
            lat_ = r.get("latency_us") or {}
            ok = r["ratio"] <= 1.0 if t == "tls-auto" else None
            tls_cpu.append((label, r, lat_.get("A", {}), lat_.get("B", {}), verdict_of(ok)))
            summary[t] = {"cpu_ratio_to_nginx": r["ratio"], "cpu_us": r["cpu_us"], "latency_us": lat_ or None,
                          "rate": r.get("rate"), "upstream_conns": r.get("upstream_conns"),
                          "target": "ezgate ≤ nginx" if ok is not None else None, "verdict": verdict_of(ok) or None}

    def tls_cpu_cells(r, la, lb):
        conns = r.get("upstream_conns") or {}
        return (f"{r['cpu_us']['A']:.1f}", f"{r['cpu_us']['B']:.1f}",
                f"{r['ratio']:.3f} ({min(r['ratios']):.3f}–{max(r['ratios']):.3f})",
                f"{f0(la.get('p50'))} / {f0(lb.get('p50'))}", f"{f0(la.get('p99'))} / {f0(lb.get('p99'))}",
                f"{conns.get('A', '—')} / {conns.get('B', '—')}")

    # Text table.
    hdr = ("measurement", "direct", "nginx", "ezgate", "ez/direct", "ez/nginx", "target", "")
    # proxy.sh --tls-only runs none of the plain stages: no main table then.
    plain = any(r["phase"] in ("tput", "lat", "sse", "mem") for r in rows)
    body = [(l, *v, rd, rn, tg, vd) for (l, v, rd, rn, tg, vd) in lines] if plain else []
    widths = [max(len(str(x[i])) for x in [hdr] + body) for i in range(len(hdr))]
    out = []
    if plain:
        out.append("  ".join(str(h).ljust(widths[i]) if i == 0 else str(h).rjust(widths[i]) for i, h in enumerate(hdr)))
    for b in body:
        out.append("  ".join(str(x).ljust(widths[i]) if i in (0, 6, 7) else str(x).rjust(widths[i])
                             for i, x in enumerate(b)))
    for label, v, c, ratio, target, vd in extra:
        out.append(f"{label}: {v:,.0f} req/s, {c if c is None else round(c, 1)} CPU µs/req, "
                   f"{ratio:.2f} × bare ezgate  {('target ' + target) if target else ''} {vd}")
    for label, v, c, p50, p99 in shared:
        out.append(f"{label}: {v:,.0f} req/s, {c if c is None else round(c, 1)} CPU µs/req, "
                   f"p50 {f0(p50)} µs, p99 {f0(p99)} µs at {meta.get('rate', 1000):,} req/s")
    if tls_mem:
        out.append(f"with a TLS upstream (TLS 1.3, ALPN), {hold_n:,} SSE streams open"
                   + (f" (extrapolated from {measured_n:,})" if measured_n < hold_n else "") + ":")
        for label, mib, kib in tls_mem:
            out.append(f"  {label}: {f1(mib)} MiB, {f1(kib)} KiB per stream")
    for label, r, la, lb, vd in tls_cpu:
        c = tls_cpu_cells(r, la, lb)
        out.append(f"with a TLS upstream, same moment ({r['rounds']} rounds): {label}: {c[1]} CPU µs/req against "
                   f"nginx {c[0]}, ezgate/nginx {c[2]}  {'target ezgate ≤ nginx ' + vd if vd else ''}")
        if la:
            out.append(f"  at {r['rate']:,} req/s, nginx / ezgate: p50 {c[3]} µs, p99 {c[4]} µs; "
                       f"connections to the upstream {c[5]}")
    noise = [r for r in rows if r["phase"] == "noise"]
    foreign = [r.get("foreign_pct") for r in rows if r.get("foreign_pct") is not None]
    noise_text = ""
    if noise or foreign:
        waited = sum(r["waited_s"] for r in noise)
        noise_text = (f"other processes on the machine during the kept runs: at most {max(foreign, default=0)}% of "
                      f"one core (median {med(foreign) or 0:.0f}%); waited {waited} s in all for a quiet machine")
        out.append(noise_text)
        summary["foreign_cpu_pct_max"] = max(foreign, default=None)
    if not judged:
        out.append(f"{profile} build of ezgate: targets are not judged (they are for release builds; "
                   "bash benches/proxy.sh builds one and runs the benchmark)")
    elif meta.get("mode") == "quick":
        out.append("quick mode: one short round each; the verdicts are a smoke check, not the benchmark "
                   "(run without --quick for that)")
    print("\n".join(out))

    if a.markdown:
        md = []
        if plain:
            md = ["| measurement | direct | nginx | ezgate | ezgate/direct | ezgate/nginx | target | |",
                  "|---|--:|--:|--:|--:|--:|---|---|"]
            for b in body:
                md.append("| " + " | ".join(str(x) for x in b) + " |")
            md.append("")
            md.append("| variant | throughput, req/s | CPU µs/req | × bare ezgate | target | |")
            md.append("|---|--:|--:|--:|---|---|")
            for label, v, c, ratio, target, vd in extra:
                md.append(f"| {label} | {v:,.0f} | {'—' if c is None else f'{c:.1f}'} | {ratio:.2f} | {target} | {vd} |")
        if shared:
            md.append("")
            md.append(f"| shared limits | throughput, req/s | CPU µs/req | p50 at {meta.get('rate', 1000):,} req/s, µs | p99, µs |")
            md.append("|---|--:|--:|--:|--:|")
            for label, v, c, p50, p99 in shared:
                md.append(f"| {label} | {v:,.0f} | {'—' if c is None else f'{c:.1f}'} | {f0(p50)} | {f0(p99)} |")
        if tls_mem:
            md.append("")
            md.append(f"| with a TLS upstream (TLS 1.3, ALPN h2 + http/1.1) | RSS with {hold_n:,} SSE streams open, MiB"
                      + (" (extrapolated)" if measured_n < hold_n else "") + " | memory per open stream, KiB |")
            md.append("|---|--:|--:|")
            for label, mib, kib in tls_mem:
                md.append(f"| {label} | {f1(mib)} | {f1(kib)} |")
        if tls_cpu:
            md.append("")
            md.append("| with a TLS upstream, loaded at the same moment (`ab.py --tls-upstream`) | nginx CPU µs/req "
                      "| ezgate CPU µs/req | ezgate/nginx (rounds) | p50 nginx / ezgate, µs | p99 nginx / ezgate, µs "
                      "| upstream connections nginx / ezgate | target | |")
            md.append("|---|--:|--:|--:|--:|--:|--:|---|---|")
            for label, r, la, lb, vd in tls_cpu:
                md.append(f"| {label} | " + " | ".join(tls_cpu_cells(r, la, lb))
                          + f" | {'ezgate ≤ nginx' if vd else ''} | {vd} |")
            rates = sorted({r.get("rate") for _, r, *_ in tls_cpu if r.get("rate")})
            if rates:
                md.append("")
                md.append(f"Latencies at {', '.join(f'{x:,}' for x in rates)} req/s (benches/bench_client.py rate, "
                          "open loop), medians of the rounds; access log on, to a file.")
        if noise_text:
            md.append("")
            md.append(noise_text[0].upper() + noise_text[1:] + ".")
        if plain:
            md.append("")
            md.append("Per-round values (the table shows their median):")
            md.append("")
        for t in (TARGETS + ["ezgate-policies", "ezgate-log"]) if plain else []:
            tr = [f"{r['requests'] / (r['duration_us'] / 1e6):,.0f}" for r in by[("tput", t)]]
            if tr:
                md.append(f"- {t}: throughput {' / '.join(tr)} req/s")
            if by[("lat", t)]:
                md.append(f"- {t}: latency p99 {' / '.join(f0(x) for x in runs(t, 'p99'))} µs, "
                          f"p99.9 {' / '.join(f0(x) for x in runs(t, 'p99.9'))} µs")
            if by[("sse", t)]:
                md.append(f"- {t}: SSE delay p99 {' / '.join(f0(x) for x in runs(t, 'p99', 'sse', 'delay_us'))} µs")
        with open(a.markdown, "w") as f:
            f.write("\n".join(md) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "summary": summary}, f, indent=2)
    missed = [k for k, v in summary.items() if isinstance(v, dict) and v.get("verdict") == "MISSED"]
    if missed:
        print("targets missed: " + ", ".join(missed))
    return 3 if (a.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
