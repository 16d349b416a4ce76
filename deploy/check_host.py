#!/usr/bin/env python3
"""Checks what the Dockerfile and the systemd unit promise, beyond what linters see.

    check_host.py dockerfile     # deploy/Dockerfile, build context = repository root
    check_host.py systemd        # deploy/systemd/ezgate.service
    check_host.py docs           # docs/deploy.md names real files and every alert

Dockerfile: multi-stage; builds `--bin ezgate` with --release --locked; the final stage is
distroless/static or scratch, runs as a numeric non-root USER, EXPOSEs the EZGATE_LISTEN /
EZGATE_ADMIN_LISTEN ports, which are those of deploy/config/ezgate.toml (the kit's ports, clear
of the ones applications and Prometheus use), copies a valid config to EZGATE_CONFIG, enters
through /usr/local/bin/ezgate in exec form, and bakes no secret; every COPY source exists; the
`docker run` lines of its header publish ports on 127.0.0.1 only.

systemd: ExecStart/ExecReload name the config the install notes put in place; reload is
SIGHUP to $MAINPID (after check-config); stop is SIGTERM with TimeoutStopSec above that
config's shutdown_grace; the key comes from an EnvironmentFile, never Environment=; the
service does not run as root.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_config  # noqa: E402

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not cur and (not line or line.startswith("#")):
            continue
        if cur and line.startswith("#"):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        word, _, rest = cur.partition(" ")
        out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def env_pairs(args: str) -> dict[str, str]:
    return dict(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', args))


def check_dockerfile(errors: list[str]) -> None:
    path = DEPLOY / "Dockerfile"
    ins = instructions(path.read_text())
    froms = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    if len(froms) < 2:
        errors.append("Dockerfile: must be multi-stage (a build stage and a runtime stage)")
        return
    build, final = ins[froms[0]:froms[-1]], ins[froms[-1]:]
    base = final[0][1].split()[0]
    if not re.match(r"^(scratch|gcr\.io/distroless/static(-debian\d+)?(:[\w.-]+)?(@sha256:[0-9a-f]{64})?)$", base):
        errors.append(f"Dockerfile: final base {base!r} is not distroless/static or scratch")
    runs = " ".join(a for w, a in build if w == "RUN")
    for need in ("cargo build", "--release", "--locked", "--bin ezgate"):
        if need not in runs:
            errors.append(f"Dockerfile: the build stage does not run `{need}`")
    users = [a for w, a in final if w == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        errors.append("Dockerfile: the final stage needs a numeric non-root USER (for runAsNonRoot)")
    env: dict[str, str] = {}
    for w, a in final:
        if w == "ENV":
            env.update({k: v.strip('"') for k, v in env_pairs(a).items()})
    exposed = {p.split("/")[0] for w, a in final if w == "EXPOSE" for p in a.split()}
    for var, port in zip(("EZGATE_LISTEN", "EZGATE_ADMIN_LISTEN"), map(str, check_config.kit_ports())):
        val = env.get(var, "")
        if not val.endswith(":" + port) or not val.startswith("0.0.0.0:"):
            errors.append(f"Dockerfile: ENV {var}={val!r}, want 0.0.0.0:{port} in a container "
                          "(the port of deploy/config/ezgate.toml)")
        if port not in exposed:
            errors.append(f"Dockerfile: EXPOSE {port} missing")
    check_published(path.name, path.read_text(), errors)
    cfg = env.get("EZGATE_CONFIG")
    copies = [a.split() for w, a in final if w == "COPY"]
    placed = {c[-1]: c[-2] for c in copies if not c[0].startswith("--from")}
    if not cfg:
        errors.append("Dockerfile: ENV EZGATE_CONFIG (the documented config path) missing")
    elif cfg not in placed:
        errors.append(f"Dockerfile: nothing is copied to EZGATE_CONFIG={cfg}")
    else:
        src = ROOT / placed[cfg]
        if src.is_file():
            errs, _ = check_config.check_text(src.read_text(), placed[cfg])
            errors.extend(f"Dockerfile: {e}" for e in errs)
    for w, a in ins:
        if w == "COPY" and not a.startswith("--from"):
            for src in [s for s in a.split()[:-1] if not s.startswith("--")]:
                if src != "." and not (ROOT / src).exists():
                    errors.append(f"Dockerfile: COPY source {src} does not exist in the build context")
        if w in ("ENV", "ARG") and re.search(r"EZLINK_API_KEY|API_KEY|SECRET|TOKEN", a):
            errors.append(f"Dockerfile: {w} {a!r} would bake a secret into the image")
    ignore = DEPLOY / "Dockerfile.dockerignore"
    if not ignore.is_file():
        errors.append("Dockerfile.dockerignore missing: the whole target/ would be sent as build context")
    else:
        pats = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        for must in ("target", ".git"):
            if must not in pats:
                errors.append(f"Dockerfile.dockerignore: does not exclude {must}")
        for needed in ("Cargo.toml", "Cargo.lock", "src", "deploy/config/ezgate.toml"):
            if any(p.lstrip("/") == needed or needed.startswith(p.rstrip("/") + "/") for p in pats):
                errors.append(f"Dockerfile.dockerignore: excludes {needed}, which the build needs")
    eps = [a for w, a in final if w == "ENTRYPOINT"]
    try:
        ep = json.loads(eps[-1]) if eps else None
    except ValueError:
        ep = None
    if not (isinstance(ep, list) and ep and ep[0] == "/usr/local/bin/ezgate"):
        errors.append("Dockerfile: ENTRYPOINT must be exec form [\"/usr/local/bin/ezgate\", ...] "
                      "(shell form would swallow SIGTERM)")
    if not any(c[-1] == "/usr/local/bin/ezgate" and c[0].startswith("--from") for c in copies):
        errors.append("Dockerfile: the final stage does not copy the built binary to /usr/local/bin/ezgate")


def check_published(name: str, text: str, errors: list[str]) -> None:
    """Every `docker run -p` shown publishes on 127.0.0.1: the proxy spends the org's key."""
    for line in text.splitlines():
        if "docker run" not in line:
            continue
        for pub in re.findall(r"(?:-p|--publish)[ =](\S+)", line):
            if not pub.startswith("127.0.0.1:"):
                errors.append(f"{name}: `docker run` publishes {pub} on all interfaces; "
                              f"use 127.0.0.1:{pub}")


def unit_directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        k, _, v = line.partition("=")
        out.setdefault(f"{section}.{k.strip()}", []).append(v.strip())
    return out


def timespan(v: str) -> float:
    total, units = 0.0, {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    parts = re.findall(r"(\d+)\s*([a-z]*)", v)
    if not parts or re.sub(r"[\d\sa-z]", "", v):
        raise ValueError(v)
    for n, u in parts:
        total += int(n) * units[u]
    return total


def check_systemd(errors: list[str]) -> None:
    path = DEPLOY / "systemd" / "ezgate.service"
    text = path.read_text()
    d = unit_directives(text)
    get = lambda k: d.get(k, [])  # noqa: E731
    start = " ".join(get("Service.ExecStart"))
    m = re.search(r"--config\s+(\S+)", start)
    if not start.startswith("/usr/local/bin/ezgate") or not m:
        errors.append("ezgate.service: ExecStart must run /usr/local/bin/ezgate --config PATH")
        return
    cfg = m.group(1)
    # The install notes copy deploy/config/ezgate.toml there: its shutdown_grace rules.
    if f"deploy/config/ezgate.toml {cfg}" not in text:
        errors.append(f"ezgate.service: the install notes do not put deploy/config/ezgate.toml at {cfg}")
    errs, doc = check_config.check_text((DEPLOY / "config" / "ezgate.toml").read_text(), "deploy/config/ezgate.toml")
    errors.extend(errs)
    grace = check_config.shutdown_grace(doc) if not errs else 30.0
    reload = get("Service.ExecReload")
    if not reload or not re.fullmatch(r"/(usr/)?bin/kill -(HUP|SIGHUP|s HUP) \$MAINPID", reload[-1]):
        errors.append("ezgate.service: the last ExecReload must be `/bin/kill -HUP $MAINPID` (ezgate reloads on SIGHUP)")
    if not any("check-config" in r and cfg in r for r in reload[:-1]):
        errors.append("ezgate.service: ExecReload should run `ezgate check-config` on the same file first")
    if get("Service.KillSignal") != ["SIGTERM"]:
        errors.append("ezgate.service: KillSignal=SIGTERM (ezgate drains on SIGTERM)")
    stop = get("Service.TimeoutStopSec")
    try:
        if not stop or timespan(stop[-1]) <= grace:
            errors.append(f"ezgate.service: TimeoutStopSec {stop} must exceed shutdown_grace {grace:g}s")
    except ValueError:
        errors.append(f"ezgate.service: TimeoutStopSec {stop} is not a time span")
    if get("Service.KillMode") not in ([], ["mixed"], ["control-group"]):
        errors.append("ezgate.service: KillMode must deliver SIGTERM to ezgate (mixed or control-group)")
    if any("EZLINK_API_KEY" in e for e in get("Service.Environment")):
        errors.append("ezgate.service: the key belongs in an EnvironmentFile, not Environment=")
    if not get("Service.EnvironmentFile"):
        errors.append("ezgate.service: EnvironmentFile with EZLINK_API_KEY missing")
    if get("Service.DynamicUser") != ["yes"] and not get("Service.User"):
        errors.append("ezgate.service: runs as root: set DynamicUser=yes or User=")
    if get("Service.Restart") not in (["on-failure"], ["always"]):
        errors.append("ezgate.service: Restart=on-failure expected")


def check_docs(errors: list[str]) -> None:
    """docs/deploy.md names files that exist, every alert, and the URL applications use."""
    path = ROOT / "docs" / "deploy.md"
    text = path.read_text()
    for ref in sorted(set(re.findall(r"`(deploy/[^`\s]*)`", text))):
        for p in expand_braces(ref):
            if not (ROOT / p.rstrip("/")).exists():
                errors.append(f"docs/deploy.md: mentions {p}, which does not exist")
    import yaml  # noqa: PLC0415 - only this check needs it
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            if "alert" in r and f"`{r['alert']}`" not in text:
                errors.append(f"docs/deploy.md: the alert table lacks {r['alert']}")
    proxy, admin = check_config.kit_ports()
    if f"http://127.0.0.1:{proxy}/v1" not in text:
        errors.append(f"docs/deploy.md: does not say where the application points its client "
                      f"(http://127.0.0.1:{proxy}/v1)")
    check_published("docs/deploy.md", text, errors)
    # The ports section names every place a port is set.
    sec = re.search(r"^## \d+\. Ports.*?(?=^## )", text, re.S | re.M)
    if not sec:
        errors.append("docs/deploy.md: no \"Ports\" section saying which ports the kit uses and how to change them")
    else:
        for must in (str(proxy), str(admin), "EZGATE_LISTEN", "EZGATE_ADMIN_LISTEN", "--listen",
                     "--admin-listen", "server.listen", "server.admin_listen", "OPENAI_BASE_URL",
                     "ezgate-admin", "containerPort", "prometheus.io/port", "PodMonitor", "probe",
                     "EXPOSE", "prometheus.yml"):
            if must not in sec.group(0):
                errors.append(f"docs/deploy.md, Ports: does not say how {must} follows a port change")


def expand_braces(ref: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", ref)
    if not m:
        return [ref]
    return [x for alt in m.group(1).split(",") for x in expand_braces(ref[:m.start()] + alt + ref[m.end():])]


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    errors: list[str] = []
    if what == "dockerfile":
        check_dockerfile(errors)
    elif what == "systemd":
        check_systemd(errors)
    elif what == "docs":
        check_docs(errors)
    else:
        print("usage: check_host.py dockerfile|systemd|docs", file=sys.stderr)
        return 2
    for e in errors:
        print(f"  ERROR {e}", file=sys.stderr)
    print(f"  checked {what}: {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
