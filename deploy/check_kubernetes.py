#!/usr/bin/env python3
"""Renders the kustomize examples and checks the fields that matter for the ezgate sidecar.

    check_kubernetes.py --kustomize "kubectl kustomize" --out DIR

Renders deploy/kubernetes/examples/{native,classic} with the given kustomize command, as they
are and with the optional components/prometheus-operator, writes each rendering to
DIR/<example>[-operator].yaml (built-in kinds, for the schema validator) and
DIR/<example>-operator.crds.yaml (the PodMonitor), and checks what a schema cannot see:

* as they are, the examples hold built-in kinds only (they apply on a cluster without the
  Prometheus Operator) and are found by the prometheus.io/* annotations; with the component,
  by a PodMonitor and no annotations: one discovery method per pod;
* the proxy and admin ports are the kit's (those of deploy/config/ezgate.toml), clear of the
  ports applications, Prometheus and meshes commonly bind, used by no other container of the
  pod, and the same in the ConfigMap's ezgate.toml as in the environment;

* native: ezgate is an init container with restartPolicy: Always; classic: a regular one;
* the config comes from the generated ConfigMap, mounted read-only where EZGATE_CONFIG points,
  and that ezgate.toml passes check_config.py;
* EZLINK_API_KEY comes from the Secret of secret.example.yaml (name and key match), never a
  literal; the proxy binds loopback, the admin port binds 0.0.0.0 on the named container port;
* the app's OPENAI_BASE_URL is http://127.0.0.1:<proxy port>/v1;
* liveness /healthz, readiness /readyz (and a startupProbe) on the admin port;
* terminationGracePeriodSeconds > shutdown_grace (+ the preStop sleep);
* resource requests and limits; non-root (the Dockerfile's UID), read-only root, no privilege
  escalation, all capabilities dropped; image tag set by kustomize, not latest;
* the PodMonitor selects the pod's labels, scrapes the admin port's /metrics, sets job=ezgate;
  the prometheus.io/* annotations name the admin port and /metrics;
* the two examples' ezgate containers are the same but for restartPolicy and lifecycle;
* the patch docs/deploy.md gives for other ports, applied to the native example, moves every
  port (listeners, container port, annotation, the application's URL; probes by name);
* components/prometheus-rules holds exactly deploy/prometheus/alerts.yml as a PrometheusRule
  (the file is generated: `check_kubernetes.py --write-rules` rewrites it), and an example
  with the component renders one PrometheusRule whose groups equal alerts.yml's.

    check_kubernetes.py --write-rules     # regenerates components/prometheus-rules/prometheusrule.yaml
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_config  # noqa: E402

DEPLOY = Path(__file__).resolve().parent
K8S = DEPLOY / "kubernetes"
EXAMPLES = ("native", "classic")
BUILTIN_GROUPS = ("v1", "apps/v1", "batch/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1")


class Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.where = ""

    def need(self, cond: bool, msg: str) -> bool:
        if not cond:
            self.errors.append(f"{self.where}: {msg}")
        return bool(cond)


def dockerfile_uid() -> int | None:
    """The numeric USER of the Dockerfile's last stage."""
    uids = re.findall(r"^\s*USER\s+(\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    return int(uids[-1]) if uids else None


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def port_number(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def check_example(c: Checker, name: str, docs: list[dict], secret: dict, operator: bool) -> dict | None:
    c.where = f"examples/{name}" + (" + components/prometheus-operator" if operator else "")
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind"), []).append(d)
    deps = by_kind.get("Deployment", [])
    cms = by_kind.get("ConfigMap", [])
    pms = by_kind.get("PodMonitor", [])
    if not (c.need(len(deps) == 1, "expected one Deployment") and c.need(len(cms) == 1, "expected one ConfigMap")
            and c.need(len(pms) == (1 if operator else 0),
                       "expected one PodMonitor" if operator else "expected no PodMonitor")):
        return None
    if not operator:
        custom = sorted({f"{d.get('apiVersion')} {d.get('kind')}" for d in docs if d.get("apiVersion") not in BUILTIN_GROUPS})
        c.need(not custom, f"{custom}: the example must apply on a cluster without their CRDs")
    dep, cm, pm = deps[0], cms[0], (pms[0] if pms else None)
    spec = dep["spec"]
    tmpl = spec["template"]
    pod = tmpl["spec"]
    labels = tmpl.get("metadata", {}).get("labels", {})
    sel = spec.get("selector", {}).get("matchLabels", {})
    c.need(sel and all(labels.get(k) == v for k, v in sel.items()),
           "Deployment selector does not match the pod template labels")
    c.need(re.fullmatch(r"ezgate-config-[a-z0-9]{6,}", cm["metadata"]["name"] or ""),
           f"ConfigMap {cm['metadata']['name']!r} is not the generated, hashed ezgate-config")

    init = [x for x in pod.get("initContainers", []) if x["name"] == "ezgate"]
    main = [x for x in pod.get("containers", []) if x["name"] == "ezgate"]
    if name == "native":
        if not c.need(len(init) == 1 and not main, "ezgate must be an init container (native sidecar)"):
            return None
        gw = init[0]
        c.need(gw.get("restartPolicy") == "Always", "native sidecar needs restartPolicy: Always")
        c.need("startupProbe" in gw, "native sidecar needs a startupProbe (it gates the app's start)")
    else:
        if not c.need(len(main) == 1 and not init, "ezgate must be a regular container (classic)"):
            return None
        gw = main[0]
        c.need("restartPolicy" not in gw, "a classic sidecar has no container restartPolicy")
    apps = [x for x in pod.get("containers", []) if x["name"] != "ezgate"]
    c.need(len(apps) >= 1, "no application container beside ezgate")

    # image
    image = gw.get("image", "")
    c.need(re.fullmatch(r"[^:@\s]+/[^:@\s]*ezgate(:[A-Za-z0-9._-]+|@sha256:[0-9a-f]{64})", image or "")
           and not image.endswith(":latest"),
           f"ezgate image {image!r}: set registry and tag with kustomize images:, not latest")

    env = env_map(gw)
    # config: EZGATE_CONFIG -> mount -> volume -> generated ConfigMap -> key -> valid toml
    cfg_path = env.get("EZGATE_CONFIG", {}).get("value", "/etc/ezgate/ezgate.toml")
    mounts = [m for m in gw.get("volumeMounts", []) if cfg_path.startswith(m["mountPath"].rstrip("/") + "/")]
    grace_cfg = None
    cfg_server: dict = {}
    if c.need(len(mounts) == 1, f"nothing mounted at {cfg_path} (EZGATE_CONFIG)"):
        mnt = mounts[0]
        c.need(mnt.get("readOnly") is True, "config volume must be mounted readOnly")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        vol = vols.get(mnt["name"], {})
        cm_ref = vol.get("configMap", {}).get("name")
        if c.need(cm_ref == cm["metadata"]["name"],
                  f"volume {mnt['name']} refers to ConfigMap {cm_ref!r}, not the generated {cm['metadata']['name']!r}"):
            key = cfg_path[len(mnt["mountPath"].rstrip("/")) + 1:]
            if c.need(key in cm.get("data", {}), f"ConfigMap has no key {key!r}"):
                errs, doc = check_config.check_text(cm["data"][key], f"{c.where} ConfigMap {key}")
                c.errors.extend(errs)
                cfg_server = doc.get("server", {})
                if not errs:
                    grace_cfg = check_config.shutdown_grace(doc)
                    c.need(doc.get("upstream", {}).get("api_key") == "${EZLINK_API_KEY}",
                           "ezgate.toml must read the key as upstream.api_key = \"${EZLINK_API_KEY}\"")

    # secret
    key_env = env.get("EZLINK_API_KEY", {})
    ref = key_env.get("valueFrom", {}).get("secretKeyRef", {})
    c.need("value" not in key_env, "EZLINK_API_KEY must not be a literal value")
    c.need(ref.get("name") == secret["metadata"]["name"] and ref.get("key") in secret.get("stringData", {}),
           f"EZLINK_API_KEY must come from Secret {secret['metadata']['name']} key "
           f"{list(secret.get('stringData', {}))}: got {ref}")
    for cont in pod.get("containers", []) + pod.get("initContainers", []):
        for e in cont.get("env", []):
            if re.search(r"\bsk-[A-Za-z0-9_-]{16,}", str(e.get("value", ""))):
                c.need(False, f"{cont['name']}: env {e['name']} holds what looks like an API key")

    # listeners and ports
    listen = env.get("EZGATE_LISTEN", {}).get("value", "")
    admin = env.get("EZGATE_ADMIN_LISTEN", {}).get("value", "")
    c.need(listen.startswith("127.0.0.1:"), f"EZGATE_LISTEN={listen!r}: the proxy must bind 127.0.0.1 in a pod")
    c.need(admin.startswith("0.0.0.0:"), f"EZGATE_ADMIN_LISTEN={admin!r}: probes need 0.0.0.0")
    proxy_port = check_config.port_of(listen)
    admin_port = check_config.port_of(admin)
    kit = check_config.kit_ports()
    c.need((proxy_port, admin_port) == kit,
           f"ports {proxy_port}/{admin_port} are not the kit's {kit[0]}/{kit[1]} (deploy/config/ezgate.toml, the image)")
    for what, port in (("proxy", proxy_port), ("admin", admin_port)):
        c.need(port not in check_config.COMMON_PORTS,
               f"the {what} port {port} is one applications, Prometheus or meshes commonly use")
    for key, port in (("listen", proxy_port), ("admin_listen", admin_port)):
        if key in cfg_server:
            c.need(check_config.port_of(cfg_server[key]) == port,
                   f"ConfigMap ezgate.toml server.{key} = {cfg_server[key]!r}, but the environment says port {port}")
    for app in apps:
        taken = {p.get("containerPort") for p in app.get("ports", [])}
        c.need(not taken & {proxy_port, admin_port},
               f"{app['name']} declares port(s) {sorted(taken & {proxy_port, admin_port})}, which ezgate binds")
    named = {p.get("name"): p.get("containerPort") for p in gw.get("ports", [])}
    c.need(named.get("ezgate-admin") == admin_port,
           f"container port ezgate-admin ({named.get('ezgate-admin')}) is not the admin listener ({admin_port})")
    for app in apps:
        base = env_map(app).get("OPENAI_BASE_URL", {}).get("value")
        c.need(base == f"http://127.0.0.1:{proxy_port}/v1",
               f"{app['name']}: OPENAI_BASE_URL={base!r}, want http://127.0.0.1:{proxy_port}/v1")

    # probes
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", None)):
        pr = gw.get(probe)
        if probe == "startupProbe" and pr is None:
            continue
        if not c.need(pr is not None and "httpGet" in pr, f"ezgate needs an httpGet {probe}"):
            continue
        hg = pr["httpGet"]
        if path:
            c.need(hg.get("path") == path, f"{probe} path {hg.get('path')!r}, want {path}")
        else:
            c.need(hg.get("path") in ("/readyz", "/healthz"), f"{probe} path {hg.get('path')!r}")
        c.need(port_number(gw, hg.get("port")) == admin_port, f"{probe} is not on the admin port")

    # shutdown
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    sleep = gw.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if name == "classic":
        c.need(sleep > 0, "classic sidecar: preStop sleep keeps ezgate serving while the app stops")
    if grace_cfg is not None:
        c.need(tgp > grace_cfg + sleep,
               f"terminationGracePeriodSeconds {tgp} must exceed shutdown_grace {grace_cfg:g}s"
               + (f" + preStop sleep {sleep}s" if sleep else ""))

    # resources and security
    res = gw.get("resources", {})
    c.need({"cpu", "memory"} <= set(res.get("requests", {})), "ezgate needs cpu and memory requests")
    c.need({"cpu", "memory"} <= set(res.get("limits", {})), "ezgate needs cpu and memory limits")
    sc = gw.get("securityContext", {})
    uid = dockerfile_uid()
    c.need(sc.get("runAsNonRoot") is True, "ezgate: runAsNonRoot: true")
    c.need(sc.get("runAsUser") not in (None, 0) and sc.get("runAsUser") == uid,
           f"ezgate: runAsUser {sc.get('runAsUser')} should be the image's USER {uid}")
    c.need(sc.get("allowPrivilegeEscalation") is False, "ezgate: allowPrivilegeEscalation: false")
    c.need(sc.get("readOnlyRootFilesystem") is True, "ezgate: readOnlyRootFilesystem: true")
    c.need("ALL" in sc.get("capabilities", {}).get("drop", []), "ezgate: capabilities drop ALL")

    # discovery: the PodMonitor (component) or the annotations, never both
    ann = tmpl.get("metadata", {}).get("annotations") or {}
    if pm is not None:
        pms_spec = pm.get("spec", {})
        ml = pms_spec.get("selector", {}).get("matchLabels", {})
        c.need(ml and all(labels.get(k) == v for k, v in ml.items()),
               f"PodMonitor selector {ml} does not select the pod (labels {labels})")
        eps = pms_spec.get("podMetricsEndpoints", [])
        if c.need(len(eps) == 1, "PodMonitor needs one podMetricsEndpoint"):
            ep = eps[0]
            c.need(ep.get("port") == "ezgate-admin" and "ezgate-admin" in named,
                   f"PodMonitor port {ep.get('port')!r} is not the ezgate container's ezgate-admin port")
            c.need(ep.get("path", "/metrics") == "/metrics", "PodMonitor path must be /metrics")
            c.need(any(r.get("targetLabel") == "job" and r.get("replacement") == "ezgate"
                       for r in ep.get("relabelings", [])),
                   "PodMonitor must set job=ezgate (alerts.yml and the dashboard select it)")
        left = sorted(k for k in ann if k.startswith("prometheus.io/"))
        c.need(not left, f"with the PodMonitor the pod still has {left}: it would be scraped twice")
    else:
        c.need(ann.get("prometheus.io/scrape") == "true", "pod annotation prometheus.io/scrape: \"true\"")
        c.need(ann.get("prometheus.io/port") == str(admin_port), "prometheus.io/port must be the admin port")
        c.need(ann.get("prometheus.io/path") == "/metrics", "prometheus.io/path must be /metrics")
    return gw


def render(c: Checker, kustomize: str, target: Path) -> list[dict] | None:
    cmd = shlex.split(kustomize) + [str(target)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if not c.need(r.returncode == 0, f"{' '.join(cmd)} failed: {r.stderr.strip()}"):
        return None
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def with_operator(out: Path, example: str) -> Path:
    """A kustomization that is the example plus the prometheus-operator component."""
    d = out / f"{example}-operator"
    d.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, d)  # noqa: E731
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(K8S / "examples" / example)],
        "components": [rel(K8S / "components" / "prometheus-operator")],
    }))
    return d


ALERTS = DEPLOY / "prometheus" / "alerts.yml"
RULES_COMPONENT = K8S / "components" / "prometheus-rules"
RULES_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `python3 deploy/check_kubernetes.py --write-rules`:
# edit alerts.yml (and its tests, alerts_test.yml), then regenerate; deploy/check.sh fails while
# the two differ. The alerting rules for the Prometheus Operator, part of the prometheus-rules
# component (docs/deploy.md).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: ezgate
  labels:
    app.kubernetes.io/name: ezgate
    # Your Prometheus resource selects rules by label (spec.ruleSelector);
    # kube-prometheus-stack, for one, wants: release: <helm release name>
spec:
"""


def prometheusrule_text() -> str:
    """alerts.yml's groups, indented under spec: (its comments and block text kept)."""
    lines = ALERTS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(("  " + line if line.strip() else "") + "\n" for line in lines[start:])
    return RULES_HEADER + body


def check_rules_component(c: Checker, kustomize: str, out: Path) -> None:
    """The PrometheusRule is alerts.yml, in the file and in a rendering with the component."""
    c.where = "components/prometheus-rules"
    path = RULES_COMPONENT / "prometheusrule.yaml"
    c.need(path.is_file() and path.read_text() == prometheusrule_text(),
           f"{path.relative_to(DEPLOY.parent)} differs from deploy/prometheus/alerts.yml: "
           "run python3 deploy/check_kubernetes.py --write-rules")
    d = out / "native-rules"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "examples" / "native", d)],
        "components": [os.path.relpath(RULES_COMPONENT, d)],
    }))
    docs = render(c, kustomize, d)
    if docs is None:
        return
    rules = [x for x in docs if x.get("kind") == "PrometheusRule"]
    if not c.need(len(rules) == 1, f"expected one PrometheusRule, got {len(rules)}"):
        return
    pr = rules[0]
    c.need(pr.get("apiVersion") == "monitoring.coreos.com/v1", f"apiVersion {pr.get('apiVersion')!r}")
    want = yaml.safe_load(ALERTS.read_text())["groups"]
    c.need(pr.get("spec", {}).get("groups") == want, "the rendered PrometheusRule's groups differ from alerts.yml")
    c.need(sum(x.get("kind") == "Deployment" for x in docs) == 1, "the example's Deployment is missing")
    (out / "native-rules.crds.yaml").write_text(yaml.safe_dump_all(rules, sort_keys=False))


def check_ports_patch(c: Checker, kustomize: str, out: Path) -> None:
    """The patch docs/deploy.md gives for other ports, applied to the native example, moves
    every port: both listeners, the named container port (only one), the annotation, the
    application's base URL."""
    c.where = "docs/deploy.md, Ports: the patch for other ports"
    text = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    m = re.search(r"one patch changes a pod's ports.*?```yaml\n(.*?)```", text, re.S)
    if not c.need(m is not None, "no yaml block after \"one patch changes a pod's ports\""):
        return
    patch = yaml.safe_load(m.group(1))
    d = out / "ports-patch"
    d.mkdir(parents=True, exist_ok=True)
    (d / "ezgate-ports.yaml").write_text(yaml.safe_dump(patch))
    (d / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "examples" / "native", d)],
        "patches": [{"path": "ezgate-ports.yaml"}],
    }))
    docs = render(c, kustomize, d)
    if docs is None:
        return
    dep = next(x for x in docs if x.get("kind") == "Deployment")
    tmpl = dep["spec"]["template"]
    gw = next(x for x in tmpl["spec"].get("initContainers", []) if x["name"] == "ezgate")
    env = {e["name"]: e.get("value") for e in gw.get("env", [])}
    proxy, admin = check_config.port_of(env.get("EZGATE_LISTEN", "")), check_config.port_of(env.get("EZGATE_ADMIN_LISTEN", ""))
    kit = check_config.kit_ports()
    c.need(proxy not in (None, kit[0]) and admin not in (None, kit[1]), f"the listeners stay on {proxy}/{admin}")
    c.need([(p.get("name"), p.get("containerPort")) for p in gw.get("ports", [])] == [("ezgate-admin", admin)],
           f"container ports {gw.get('ports')}: want only ezgate-admin on {admin}")
    ann = tmpl.get("metadata", {}).get("annotations", {})
    c.need(ann.get("prometheus.io/port") == str(admin), f"prometheus.io/port {ann.get('prometheus.io/port')!r}")
    for app in tmpl["spec"].get("containers", []):
        base = env_map(app).get("OPENAI_BASE_URL", {}).get("value")
        c.need(base == f"http://127.0.0.1:{proxy}/v1", f"{app['name']}: OPENAI_BASE_URL={base!r}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = gw.get(probe, {}).get("httpGet", {}).get("port")
        c.need(port_number(gw, port) == admin, f"{probe} is not on the new admin port")
    (out / "ports-patch.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kustomize", default="kubectl kustomize", help="command that renders a kustomization dir")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--write-rules", action="store_true",
                    help="regenerate components/prometheus-rules/prometheusrule.yaml from alerts.yml")
    a = ap.parse_args()
    if a.write_rules:
        (RULES_COMPONENT / "prometheusrule.yaml").write_text(prometheusrule_text())
        print(f"  wrote {(RULES_COMPONENT / 'prometheusrule.yaml').relative_to(DEPLOY.parent)}")
        return 0
    if a.out is None:
        ap.error("--out is required")
    a.out.mkdir(parents=True, exist_ok=True)
    c = Checker()
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    c.where = "secret.example.yaml"
    c.need(secret.get("kind") == "Secret" and "EZLINK_API_KEY" in secret.get("stringData", {}),
           "must be a Secret with stringData.EZLINK_API_KEY")
    c.need(not re.search(r"sk-[A-Za-z0-9]{16,}", str(secret.get("stringData"))), "holds a real-looking key")
    sidecars = {}
    for ex in EXAMPLES:
        for operator in (False, True):
            c.where = f"examples/{ex}" + (" + components/prometheus-operator" if operator else "")
            target = with_operator(a.out, ex) if operator else K8S / "examples" / ex
            docs = render(c, a.kustomize, target)
            if docs is None:
                continue
            stem = f"{ex}-operator" if operator else ex
            builtin = [d for d in docs if d.get("apiVersion") in BUILTIN_GROUPS]
            other = [d for d in docs if d.get("apiVersion") not in BUILTIN_GROUPS]
            (a.out / f"{stem}.yaml").write_text(yaml.safe_dump_all(builtin, sort_keys=False))
            if other:
                (a.out / f"{stem}.crds.yaml").write_text(yaml.safe_dump_all(other, sort_keys=False))
            gw = check_example(c, ex, docs, secret, operator)
            if gw is not None and not operator:
                sidecars[ex] = gw
    check_ports_patch(c, a.kustomize, a.out)
    check_rules_component(c, a.kustomize, a.out)
    if len(sidecars) == 2:
        c.where = "examples native vs classic"
        strip = lambda g: {k: v for k, v in g.items() if k not in ("restartPolicy", "lifecycle")}  # noqa: E731
        diff = sorted(k for k in set(strip(sidecars["native"])) | set(strip(sidecars["classic"]))
                      if strip(sidecars["native"]).get(k) != strip(sidecars["classic"]).get(k))
        c.need(not diff, f"the ezgate containers differ in {diff} (only restartPolicy/lifecycle may)")
    for e in c.errors:
        print(f"  ERROR {e}", file=sys.stderr)
    print(f"  checked {len(EXAMPLES)} examples, with and without the PodMonitor, and the PrometheusRule: "
          f"{len(c.errors)} problem(s)")
    return 1 if c.errors else 0


if __name__ == "__main__":
    sys.exit(main())
