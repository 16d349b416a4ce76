#!/usr/bin/env python3
"""Checks every PromQL query of the deploy kit against the metrics ezgate exports.

    check_dashboard.py [--dashboard FILE] [--rules FILE] [--catalogue docs/metrics.md]
    check_dashboard.py --rule-tests FILE      # every alert fires in a test and stays quiet in one
    check_dashboard.py --exposition FILE      # a scraped /metrics text, checked the same way

Each `expr` of the Grafana dashboard (panels and template variables) and of the alerting
rules is parsed with a real PromQL parser (promql-parser, the Rust parser's Python binding),
then walked:

* every selector names a series ezgate exports (docs/metrics.md; histograms as _bucket/_sum/
  _count), `up`, or nothing else;
* every label in a selector, `by`/`without`, `on`/`ignoring`, `group_left/right`,
  `label_replace`, a Grafana legend `{{label}}` or an alert template `$labels.x` exists on
  the series at that point of the query (exported labels, plus the target labels Prometheus
  adds: job, instance, namespace, pod, container, endpoint);
* label values in matchers belong to the bounded sets (source, status_class, decision, code,
  kind, method, route; status is a three-digit code), regexes included;
* rate()/increase() only see counters, histogram_quantile() only _bucket series with `le`;
* the dashboard covers every ezgate_* family and the views the deploy issue asks for.

With --catalogue, the metric table here is compared with the table of docs/metrics.md, the
users' reference, so that the two cannot drift apart silently. Exit status 1 and one line per problem on failure.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    import promql_parser as pp
except ImportError:  # pragma: no cover - check.sh installs it
    sys.exit("check_dashboard.py: needs the promql-parser package (pip install promql-parser)")
try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("check_dashboard.py: needs PyYAML (pip install pyyaml)")

# ---- what ezgate exports (docs/metrics.md) --------------------------------------------------
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ezgate_requests_total": ("counter", ("route", "method", "status", "source")),
    "ezgate_request_duration_seconds": ("histogram", ("route", "status_class")),
    "ezgate_upstream_responses_total": ("counter", ("status", "model")),
    "ezgate_upstream_failures_total": ("counter", ("kind",)),
    "ezgate_upstream_header_duration_seconds": ("histogram", ("route",)),
    "ezgate_overhead_seconds": ("histogram", ("route",)),
    "ezgate_gateway_errors_total": ("counter", ("code",)),
    "ezgate_ratelimit_decisions_total": ("counter", ("policy", "decision")),
    "ezgate_ratelimit_keys": ("gauge", ("policy",)),
    "ezgate_fleet_gateways": ("gauge", ()),
    "ezgate_buffered_request_bytes": ("gauge", ()),
    "ezgate_ratelimit_store_fallbacks_total": ("counter", ("policy",)),
    "ezgate_ratelimit_store_up": ("gauge", ()),
    "ezgate_ratelimit_store_check_duration_seconds": ("histogram", ()),
    "ezgate_ratelimit_utilization": ("gauge", ("policy",)),
    "ezgate_upstream_cooldowns": ("gauge", ()),
    "ezgate_config_reloads_total": ("counter", ("result",)),
    "ezgate_config_info": ("gauge", ("hash",)),
    "ezgate_upstream_quota_limit": ("gauge", ("model", "unit")),
    "ezgate_upstream_quota_remaining": ("gauge", ("model", "unit")),
    "ezgate_queued_requests": ("gauge", ("priority",)),
    "ezgate_queue_wait_seconds": ("histogram", ("priority",)),
    "ezgate_inflight_requests": ("gauge", ("route",)),
    "ezgate_tokens_total": ("counter", ("model", "kind", "client")),
    "ezgate_cost_total": ("counter", ("client", "model")),
    "ezgate_budget_spent": ("gauge", ("budget", "key")),
    "ezgate_budget_limit": ("gauge", ("budget", "key")),
    "ezgate_client_requests_total": ("counter", ("client", "status")),
    "ezgate_time_to_first_token_seconds": ("histogram", ("route", "model")),
    "ezgate_time_per_output_token_seconds": ("histogram", ("model",)),
    "ezgate_websocket_sessions_total": ("counter", ("end",)),
    "ezgate_websocket_bytes_total": ("counter", ("direction",)),
    "ezgate_trace_spans_exported_total": ("counter", ()),
    "ezgate_trace_spans_dropped_total": ("counter", ("reason",)),
    "ezgate_build_info": ("gauge", ("version", "commit", "profile")),
    # prometheus crate, process collector
    "process_cpu_seconds_total": ("counter", ()),
    "process_resident_memory_bytes": ("gauge", ()),
    "process_virtual_memory_bytes": ("gauge", ()),
    "process_open_fds": ("gauge", ()),
    "process_max_fds": ("gauge", ()),
    "process_start_time_seconds": ("gauge", ()),
    "process_threads": ("gauge", ()),
}
# Series Prometheus itself makes per target.
SYNTHETIC: dict[str, tuple[str, tuple[str, ...]]] = {"up": ("gauge", ())}
# Labels the scrape adds (PodMonitor: namespace, pod, container, endpoint; all: job, instance).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})

GATEWAY_CODES = frozenset("""
    rate_limited token_rate_limited concurrency_limited upstream_rate_limited
    upstream_quota_exhausted budget_exceeded missing_api_key
    invalid_api_key model_not_allowed route_not_allowed payload_too_large upstream_unreachable
    upstream_bad_response upstream_timeout upstream_stream_interrupted overloaded
    shutting_down internal_error bad_request not_found method_not_allowed request_timeout
    client_closed_request headers_too_large uri_too_long""".split())
ROUTES = frozenset("""
    /v1/chat/completions /v1/completions /v1/embeddings /v1/models /v1/models/{model}
    /v1/responses /v1/moderations /v1/images/generations /v1/audio/transcriptions
    /v1/audio/speech /v1/files /v1/realtime other""".split())
STATUS = frozenset([str(c) for c in range(100, 600)])
_ANY = None  # open set (policy, model, version, target labels): values not checked
VALUES: dict[tuple[str, str], frozenset[str] | None] = {
    ("*", "route"): ROUTES,
    ("*", "status"): STATUS,
    ("*", "source"): frozenset({"gateway", "upstream"}),
    ("*", "status_class"): frozenset({"1xx", "2xx", "3xx", "4xx", "5xx"}),
    ("*", "method"): frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"}),
    ("*", "code"): GATEWAY_CODES,
    ("*", "decision"): frozenset({"allowed", "limited", "shadow_limited", "waited"}),
    ("ezgate_upstream_failures_total", "kind"): frozenset({"connect", "tls", "timeout", "reset", "protocol"}),
    ("ezgate_tokens_total", "kind"): frozenset({"prompt", "completion"}),
    ("ezgate_websocket_sessions_total", "end"): frozenset({"client_closed", "upstream_closed", "idle_timeout", "shutdown",
                                                           "max_lifetime", "ping_timeout"}),
    ("ezgate_websocket_bytes_total", "direction"): frozenset({"to_upstream", "to_client"}),
    ("ezgate_trace_spans_dropped_total", "reason"): frozenset({"queue_full", "export_failed"}),
    ("ezgate_config_reloads_total", "result"): frozenset({"applied", "refused"}),
    ("ezgate_upstream_quota_limit", "unit"): frozenset({"requests", "tokens"}),
    ("ezgate_upstream_quota_remaining", "unit"): frozenset({"requests", "tokens"}),
    ("*", "priority"): frozenset({"critical", "interactive", "batch"}),
}

COUNTER_FUNCS = {"rate", "irate", "increase", "resets"}
GRAFANA_BUILTINS = {"$__rate_interval": "5m", "${__rate_interval}": "5m", "$__interval": "1m",
                    "${__interval}": "1m", "$__range": "6h", "${__range}": "6h"}


def series_catalog() -> dict[str, tuple[str, str, frozenset[str]]]:
    """series name -> (family, kind, labels it carries as exported)."""
    out: dict[str, tuple[str, str, frozenset[str]]] = {}
    for fam, (kind, labels) in {**FAMILIES, **SYNTHETIC}.items():
        ls = frozenset(labels)
        if kind == "histogram":
            out[fam + "_bucket"] = (fam, "bucket", ls | {"le"})
            out[fam + "_sum"] = (fam, "counter", ls)
            out[fam + "_count"] = (fam, "counter", ls)
        else:
            out[fam] = (fam, kind, ls)
    return out


SERIES = series_catalog()


def value_domain(family: str, label: str):
    if (family, label) in VALUES:
        return VALUES[(family, label)]
    return VALUES.get(("*", label), _ANY)


# ---- walking a parsed query -----------------------------------------------------------------
@dataclass
class Facts:
    """What one query uses, for the coverage checks."""
    families: set[str] = field(default_factory=set)
    quantiles: set[tuple[float, str, frozenset[str]]] = field(default_factory=set)
    grouped: set[tuple[str, frozenset[str]]] = field(default_factory=set)


class Walker:
    def __init__(self, where: str, errors: list[str]):
        self.where = where
        self.errors = errors
        self.facts = Facts()

    def err(self, msg: str) -> None:
        self.errors.append(f"{self.where}: {msg}")

    def sub(self, e) -> tuple[frozenset[str] | None, Facts]:
        """Walks a subexpression with its own facts, then adds them to ours."""
        w = Walker(self.where, self.errors)
        res = w.labels(e)
        self.facts.families |= w.facts.families
        self.facts.quantiles |= w.facts.quantiles
        self.facts.grouped |= w.facts.grouped
        return res, w.facts

    # Returns the labels the result carries, or None for a scalar/string.
    def labels(self, e) -> frozenset[str] | None:
        if isinstance(e, pp.VectorSelector):
            return self.selector(e)
        if isinstance(e, pp.MatrixSelector):
            return self.selector(e.vector_selector)
        if isinstance(e, (pp.ParenExpr, pp.UnaryExpr, pp.SubqueryExpr)):
            return self.labels(e.expr)
        if isinstance(e, (pp.NumberLiteral, pp.StringLiteral)):
            return None
        if isinstance(e, pp.Call):
            return self.call(e)
        if isinstance(e, pp.AggregateExpr):
            return self.aggregate(e)
        if isinstance(e, pp.BinaryExpr):
            return self.binary(e)
        self.err(f"unsupported PromQL node {type(e).__name__}")
        return frozenset()

    def selector(self, vs) -> frozenset[str]:
        matchers = list(vs.matchers.matchers)
        for group in vs.matchers.or_matchers or []:
            matchers.extend(group)
        name = vs.name
        if name is None:
            names = [m.value for m in matchers if m.name == "__name__" and m.op == pp.MatchOp.Equal]
            if len(names) != 1:
                self.err(f"selector {vs} has no exact metric name")
                return frozenset(TARGET_LABELS)
            name = names[0]
        if name not in SERIES:
            hint = ""
            for cand in SERIES:
                if cand.startswith(name) or name.startswith(cand.rsplit("_", 1)[0]):
                    hint = f" (did you mean {cand}?)"
                    break
            self.err(f"unknown metric {name!r}: ezgate exports no such series{hint}")
            return frozenset(TARGET_LABELS)
        family, _kind, exported = SERIES[name]
        self.facts.families.add(family)
        available = exported | TARGET_LABELS
        for m in matchers:
            if m.name == "__name__":
                continue
            if m.name not in available:
                self.err(f"{name} has no label {m.name!r} (it has: {', '.join(sorted(available))})")
                continue
            self.check_value(family, m)
        return available

    def check_value(self, family: str, m) -> None:
        domain = value_domain(family, m.name)
        if domain is None or "$" in m.value:
            return
        if m.op in (pp.MatchOp.Equal, pp.MatchOp.NotEqual):
            if m.value not in domain:
                self.err(f"{family}: {m.name}={m.value!r} is never exported "
                         f"(values: {', '.join(sorted(domain)[:20])}{' …' if len(domain) > 20 else ''})")
            return
        try:
            rx = re.compile(m.value)
        except re.error as ex:
            self.err(f"{family}: bad regex {m.name}=~{m.value!r}: {ex}")
            return
        if not any(rx.fullmatch(v) for v in domain):
            self.err(f"{family}: {m.name}=~{m.value!r} matches no exported value")
            return
        # A plain alternation of literals: each alternative must be a real value (typos).
        if re.fullmatch(r"[A-Za-z0-9_/{}-]+(\|[A-Za-z0-9_/{}-]+)*", m.value):
            for alt in m.value.split("|"):
                if alt not in domain:
                    self.err(f"{family}: {m.name}=~...{alt}... is never exported")

    def call(self, c) -> frozenset[str] | None:
        fn = c.func.name
        args = list(c.args)
        if fn in COUNTER_FUNCS and args and isinstance(args[0], pp.MatrixSelector):
            vs = args[0].vector_selector
            kind = SERIES.get(vs.name or "", ("", "", None))[1]
            if kind in ("gauge",):
                self.err(f"{fn}() over gauge {vs.name}: use it directly or deriv()/delta()")
        if fn == "histogram_quantile":
            phi = args[0].val if isinstance(args[0], pp.NumberLiteral) else None
            inner, facts = self.sub(args[1])
            if inner is None or "le" not in inner:
                self.err("histogram_quantile() needs _bucket series grouped with `le`")
                return frozenset()
            res = inner - {"le"}
            for fam in facts.families:
                if FAMILIES.get(fam, ("",))[0] == "histogram" and phi is not None:
                    self.facts.quantiles.add((phi, fam, res))
            return res
        if fn in ("label_replace", "label_join"):
            base = self.labels(args[0]) or frozenset()
            strs = [a.val for a in args[1:] if isinstance(a, pp.StringLiteral)]
            dst = strs[0]
            srcs = [strs[2]] if fn == "label_replace" else strs[2:]
            for s in srcs:
                if s and s not in base:
                    self.err(f"{fn}() reads label {s!r}, which the series do not have")
            return base | {dst}
        if fn in ("absent", "absent_over_time"):
            self.labels(args[0])
            inner = args[0].vector_selector if isinstance(args[0], pp.MatrixSelector) else args[0]
            if isinstance(inner, pp.VectorSelector):
                return frozenset(m.name for m in inner.matchers.matchers
                                 if m.op == pp.MatchOp.Equal and m.name != "__name__")
            return frozenset()
        if fn in ("time", "pi", "scalar"):
            for a in args:
                self.labels(a)
            return None
        if fn == "vector":
            return frozenset()
        result: frozenset[str] | None = None
        for a in args:
            ls = self.labels(a)
            if result is None and ls is not None:
                result = ls
        return result if result is not None else frozenset()

    def aggregate(self, a) -> frozenset[str]:
        op = str(a.op)
        inner_labels, inner_facts = self.sub(a.expr)
        inner = inner_labels or frozenset()
        if a.param is not None:
            self.labels(a.param)
        mod = a.modifier
        if mod is None:
            res = inner if op in ("topk", "bottomk", "limitk", "limit_ratio") else frozenset()
        else:
            ls = frozenset(mod.labels)
            missing = ls - inner
            if missing:
                self.err(f"{op} {'by' if mod.type == pp.AggModifierType.By else 'without'} "
                         f"({', '.join(sorted(missing))}): no such label on the series "
                         f"(they have: {', '.join(sorted(inner))})")
            if op in ("topk", "bottomk", "limitk", "limit_ratio"):
                res = inner
            elif mod.type == pp.AggModifierType.By:
                res = ls
            else:
                res = inner - ls
        if op == "count_values" and isinstance(a.param, pp.StringLiteral):
            res = res | {a.param.val}
        for fam in inner_facts.families:
            self.facts.grouped.add((fam, res))
        return res

    def binary(self, b) -> frozenset[str] | None:
        lhs, rhs = self.labels(b.lhs), self.labels(b.rhs)
        op = str(b.op)
        if lhs is None or rhs is None:
            return rhs if lhs is None else lhs
        mod = b.modifier
        matching = mod.matching if mod is not None else None
        card = mod.card if mod is not None else None
        if matching is not None:
            ls = frozenset(matching.labels)
            if matching.type == pp.LabelModifierType.Include:
                for side, have in (("left", lhs), ("right", rhs)):
                    if ls - have:
                        self.err(f"on ({', '.join(sorted(ls - have))}): not on the {side} side of {op}")
            elif ls - (lhs | rhs):
                self.err(f"ignoring ({', '.join(sorted(ls - (lhs | rhs)))}): on neither side of {op}")
        group = frozenset(getattr(mod, "group_labels", None) or []) if mod is not None else frozenset()
        if op in ("and", "unless"):
            return lhs
        if op == "or":
            return lhs | rhs
        if card == pp.VectorMatchCardinality.ManyToOne:
            if group - rhs:
                self.err(f"group_left ({', '.join(sorted(group - rhs))}): not on the right side")
            return lhs | group
        if card == pp.VectorMatchCardinality.OneToMany:
            if group - lhs:
                self.err(f"group_right ({', '.join(sorted(group - lhs))}): not on the left side")
            return rhs | group
        if matching is not None and matching.type == pp.LabelModifierType.Include:
            return frozenset(matching.labels)
        if matching is not None:
            return lhs - frozenset(matching.labels)
        return lhs


def check_expr(expr: str, where: str, errors: list[str]) -> tuple[frozenset[str] | None, Facts]:
    text = expr
    for k, v in GRAFANA_BUILTINS.items():
        text = text.replace(k, v)
    try:
        tree = pp.parse(text)
    except ValueError as ex:
        errors.append(f"{where}: does not parse: {ex}: {expr}")
        return frozenset(), Facts()
    w = Walker(where, errors)
    res = w.labels(tree)
    return res, w.facts


LEGEND_RE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
LABELS_RE = re.compile(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)")


# ---- the dashboard --------------------------------------------------------------------------
def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def check_dashboard(path: Path, errors: list[str]) -> int:
    try:
        dash = json.loads(path.read_text())
    except (OSError, ValueError) as ex:
        errors.append(f"{path}: not readable JSON: {ex}")
        return 0
    n = 0
    all_facts = Facts()
    # template variables: label_values(selector, label) or a query
    var_names = {"datasource"}
    for v in dash.get("templating", {}).get("list", []):
        var_names.add(v.get("name"))
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        where = f"{path.name}: variable ${v.get('name')}"
        n += 1
        m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q or "")
        if not m:
            errors.append(f"{where}: only label_values(selector, label) queries are supported: {q!r}")
            continue
        res, facts = check_expr(m.group(1), where, errors)
        if res is not None and m.group(2) not in res:
            errors.append(f"{where}: label_values(..., {m.group(2)}): the series have no such label")
    ids: set[int] = set()
    boxes = []
    for p in walk_panels(dash.get("panels", [])):
        title = p.get("title", "?")
        pid = p.get("id")
        if pid in ids:
            errors.append(f"{path.name}: duplicate panel id {pid} ({title})")
        ids.add(pid)
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g["x"] + g["w"] > 24:
            errors.append(f"{path.name}: panel {title!r}: bad gridPos {g}")
        else:
            for (ot, og) in boxes:
                if (g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"]
                        and g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"]):
                    errors.append(f"{path.name}: panels {title!r} and {ot!r} overlap")
            boxes.append((title, g))
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"{path.name}: panel {title!r} has no query")
        ds = (p.get("datasource") or {}).get("uid")
        if ds != "${datasource}":
            errors.append(f"{path.name}: panel {title!r} does not use the $datasource variable")
        for t in targets:
            expr = t.get("expr", "")
            where = f"{path.name}: panel {title!r} query {t.get('refId')}"
            if not expr.strip():
                errors.append(f"{where}: empty expr")
                continue
            for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr):
                if var not in var_names and not var.startswith("__"):
                    errors.append(f"{where}: uses undefined variable ${var}")
            n += 1
            res, facts = check_expr(expr, where, errors)
            all_facts.families |= facts.families
            all_facts.quantiles |= facts.quantiles
            all_facts.grouped |= facts.grouped
            for lab in LEGEND_RE.findall(t.get("legendFormat", "")):
                if res is None or lab not in res:
                    errors.append(f"{where}: legend uses {{{{{lab}}}}}, which the result does not carry "
                                  f"(it has: {', '.join(sorted(res or []))})")
    # coverage: every ezgate family on the dashboard
    for fam in FAMILIES:
        if fam.startswith("ezgate_") and fam not in all_facts.families:
            errors.append(f"{path.name}: no panel shows {fam}")
    # the views the deploy issue asks for
    def grouped(fam, need):
        return any(f == fam and need <= ls for f, ls in all_facts.grouped)
    wanted = [
        ("requests by status and source", grouped("ezgate_requests_total", {"status", "source"})),
        ("rate-limit decisions by policy", grouped("ezgate_ratelimit_decisions_total", {"policy", "decision"})),
        ("tokens by model", grouped("ezgate_tokens_total", {"model"})),
        ("in-flight requests", "ezgate_inflight_requests" in all_facts.families),
        ("latency p50 by route", any(q == 0.5 and f == "ezgate_request_duration_seconds" and "route" in ls
                                     for q, f, ls in all_facts.quantiles)),
        ("latency p99 by route", any(q == 0.99 and f == "ezgate_request_duration_seconds" and "route" in ls
                                     for q, f, ls in all_facts.quantiles)),
        ("error ratio", any(re.search(r'status=~"5\.\."', t.get("expr", "")) and "/" in t.get("expr", "")
                            for p in walk_panels(dash.get("panels", [])) for t in p.get("targets", []))),
    ]
    for what, ok in wanted:
        if not ok:
            errors.append(f"{path.name}: the dashboard lacks a view of {what}")
    return n


def emit_rules(dashboards: list[Path], out: Path) -> None:
    """The dashboard's queries as recording rules, so that Prometheus' own parser sees them."""
    rules = []
    for d in dashboards:
        dash = json.loads(d.read_text())
        for p in walk_panels(dash.get("panels", [])):
            for t in p.get("targets", []):
                expr = t.get("expr", "")
                for k, v in GRAFANA_BUILTINS.items():
                    expr = expr.replace(k, v)
                if expr.strip():
                    rules.append({"record": f"dashboard:panel_{p.get('id')}_{t.get('refId')}", "expr": expr})
    out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))


# ---- alerting rules -------------------------------------------------------------------------
def check_rules(path: Path, errors: list[str]) -> int:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as ex:
        errors.append(f"{path}: not readable YAML: {ex}")
        return 0
    n = 0
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            where = f"{path.name}: {name}"
            n += 1
            res, _ = check_expr(r.get("expr", ""), where, errors)
            if "alert" not in r:
                continue
            labels = res or frozenset()
            rule_labels = set((r.get("labels") or {}).keys())
            if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                errors.append(f"{where}: needs labels.severity critical|warning|info")
            for k in ("summary", "description"):
                if not (r.get("annotations") or {}).get(k):
                    errors.append(f"{where}: needs annotations.{k}")
            texts = list((r.get("annotations") or {}).values()) + list((r.get("labels") or {}).values())
            for text in texts:
                for lab in LABELS_RE.findall(str(text)):
                    if lab not in labels and lab not in rule_labels:
                        errors.append(f"{where}: templates $labels.{lab}, which the alert does not "
                                      f"carry (it has: {', '.join(sorted(labels))})")
    return n


def check_rule_tests(path: Path, errors: list[str]) -> int:
    """Every alert of the tested rule files has a case where it fires and one where it must not."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as ex:
        errors.append(f"{path}: not readable YAML: {ex}")
        return 0
    alerts: list[str] = []
    for rf in doc.get("rule_files", []):
        rules = yaml.safe_load((path.parent / rf).read_text())
        alerts += [r["alert"] for g in rules.get("groups", []) for r in g.get("rules", []) if "alert" in r]
    fires, quiet = set(), set()
    for t in doc.get("tests", []):
        for case in t.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case.get("alertname"))
    for name in alerts:
        if name not in fires:
            errors.append(f"{path.name}: no test where {name} fires")
        if name not in quiet:
            errors.append(f"{path.name}: no test where {name} must stay quiet")
    for name in (fires | quiet) - set(alerts):
        errors.append(f"{path.name}: tests an alert {name} that no rule file defines")
    return len(alerts)


# ---- a scraped /metrics ---------------------------------------------------------------------
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+(\s+\S+)?$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def check_exposition(path: Path, errors: list[str]) -> int:
    """Every ezgate_/process_ series in a scrape is in the catalogue, with exactly its labels."""
    n = 0
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if not m:
            errors.append(f"{path.name}: unparsable line {line!r}")
            continue
        name = m.group(1)
        if not name.startswith(("ezgate_", "process_")):
            continue
        n += 1
        labels = dict(LABEL_RE.findall(m.group(3) or ""))
        if name not in SERIES:
            errors.append(f"{path.name}: exports {name}, which the deploy kit does not know "
                          "(add it to check_dashboard.py FAMILIES, and to docs/metrics.md)")
            continue
        family, _, expected = SERIES[name]
        if set(labels) != set(expected):
            errors.append(f"{path.name}: {name} has labels {sorted(labels)}, expected {sorted(expected)}")
        for k, v in labels.items():
            dom = value_domain(family, k) if k != "le" else None
            if dom is not None and v not in dom:
                errors.append(f"{path.name}: {name}{{{k}={v!r}}}: value outside the known set")
    return n


# ---- the catalogue --------------------------------------------------------------------------
def check_catalogue(path: Path, errors: list[str]) -> int:
    """The metric table of docs/metrics.md (metric | type | labels | meaning) equals FAMILIES."""
    seen = {}
    for name, kind, labels_col in re.findall(
        r"^\|\s*`([a-z_]+)`\s*\|\s*([a-z]+)\s*\|([^|]*)\|", path.read_text(), re.M
    ):
        labels_col = re.sub(r"\([^()]*\)", "", labels_col)
        seen[name] = (kind, tuple(re.findall(r"`([a-z_]+)`", labels_col)))
    n = 0
    ours = {k: v for k, v in FAMILIES.items() if k.startswith("ezgate_")}
    for name, (kind, labels) in seen.items():
        n += 1
        if name not in ours:
            errors.append(f"{path.name} lists {name}; check_dashboard.py FAMILIES does not")
        elif ours[name] != (kind, labels):
            errors.append(f"{path.name}: {name} is {kind} {labels}; FAMILIES says {ours[name]}")
    for name in ours:
        if name not in seen:
            errors.append(f"FAMILIES has {name}; {path.name} does not")
    if not seen:
        errors.append(f"{path}: found no metric table")
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dashboard", type=Path, action="append", default=[])
    ap.add_argument("--rules", type=Path, action="append", default=[])
    ap.add_argument("--rule-tests", type=Path, action="append", default=[])
    ap.add_argument("--exposition", type=Path, action="append", default=[])
    ap.add_argument("--catalogue", type=Path)
    ap.add_argument("--emit-rules", type=Path, metavar="FILE",
                    help="also write the dashboard queries as recording rules, for `promtool check rules`")
    a = ap.parse_args()
    errors: list[str] = []
    counts = []
    for d in a.dashboard:
        counts.append(f"{check_dashboard(d, errors)} dashboard queries")
    if a.emit_rules:
        emit_rules(a.dashboard, a.emit_rules)
    for r in a.rules:
        counts.append(f"{check_rules(r, errors)} rules")
    for t in a.rule_tests:
        counts.append(f"{check_rule_tests(t, errors)} alerts with tests")
    for e in a.exposition:
        counts.append(f"{check_exposition(e, errors)} scraped series")
    if a.catalogue:
        counts.append(f"{check_catalogue(a.catalogue, errors)} documented metrics")
    for e in errors:
        print(f"  ERROR {e}", file=sys.stderr)
    print(f"  checked {', '.join(counts) or 'nothing'}: {len(errors)} problem(s)")
    return 1 if errors or not counts else 0


if __name__ == "__main__":
    sys.exit(main())
