#!/usr/bin/env python3
"""Checks an ezgate.toml of the deploy kit against the documented settings, without the binary.

    check_config.py FILE...

Only the keys the README and config/ezgate.toml document are accepted (the binary may know
more; the deploy kit sticks to the documented surface), with their value formats: durations
"250ms"/"30s"/"5m", sizes "16MiB", rates "N/s|min|h|day" (or the other unit spellings),
socket addresses (an IP and a port), an http(s) base_url. Secrets must be "${VAR}" or
"${file:/path}" references: a literal key in a file of the deploy kit is an error. The listen ports must
keep clear of the ports applications, Prometheus and meshes commonly bind. Imported by the
other checks for shutdown_grace and the kit's ports.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")
SIZE = re.compile(r"^\d+(B|KB|MB|GB|KiB|MiB|GiB)?$")
RATE = re.compile(r"^\d+/(s|sec|seconds?|m|min|minutes?|h|hours?|d|days?)$")
ADDR = re.compile(r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):\d{1,5}$")
SECRET = re.compile(r"^\$\{([A-Z_][A-Z0-9_]*|file:/[^\s}]+)\}$")

SCHEMA = {
    "server": {"listen": ADDR, "admin_listen": ADDR, "max_request_body": SIZE,
               "max_buffered_bytes": SIZE, "request_body_deadline": DURATION,
               "shutdown_grace": DURATION, "tls": {"cert": str, "key": str}},
    "upstream": {"base_url": re.compile(r"^https?://[^\s/]+(/\S*)?$"), "api_key": SECRET,
                 "connect_timeout": DURATION, "response_timeout": DURATION,
                 "stream_idle_timeout": DURATION, "ca_file": str, "forward_client_ip": bool},
}
CLIENT = {"name": str, "key_sha256": re.compile(r"^[0-9a-f]{64}$"), "models": list}
LIMIT = {"name": str, "key": re.compile(r"^(client|api_key|ip|model|global|header:[A-Za-z0-9-]+)$"),
         "requests": RATE, "burst": int, "tokens": RATE, "concurrency": int,
         "match": {"routes": list, "models": list}, "mode": re.compile(r"^(enforce|shadow)$"),
         "on_limit": re.compile(r"^(reject|wait)$"), "max_wait": DURATION}


def seconds(d: str) -> float:
    m = DURATION.match(d)
    if not m:
        raise ValueError(f"not a duration: {d!r}")
    n, unit = int(m.group(1)), m.group(2)
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def _check(table: dict, schema: dict, path: str, errors: list[str]) -> None:
    for key, val in table.items():
        where = f"{path}.{key}" if path else key
        if key not in schema:
            errors.append(f"{where}: not a documented ezgate setting")
            continue
        rule = schema[key]
        if isinstance(rule, dict):
            if not isinstance(val, dict):
                errors.append(f"{where}: must be a table")
            else:
                _check(val, rule, where, errors)
        elif rule is bool:
            if not isinstance(val, bool):
                errors.append(f"{where}: must be true or false")
        elif rule is int:
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                errors.append(f"{where}: must be a positive integer")
        elif rule is list:
            if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
                errors.append(f"{where}: must be a list of strings")
        elif rule is str:
            if not isinstance(val, str) or not val:
                errors.append(f"{where}: must be a non-empty string")
        elif not isinstance(val, str) or not rule.match(val):
            errors.append(f"{where}: {val!r} is not valid here")


def check_text(text: str, name: str) -> tuple[list[str], dict]:
    errors: list[str] = []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as ex:
        return [f"{name}: not TOML: {ex}"], {}
    top = {k: v for k, v in doc.items() if k not in ("clients", "limits")}
    _check(top, SCHEMA, "", errors)
    for key in ("listen", "admin_listen"):
        port = port_of(str(doc.get("server", {}).get(key, "")))
        if port in COMMON_PORTS:
            errors.append(f"server.{key}: port {port} is one applications, Prometheus or meshes "
                          "commonly use; the kit keeps clear of them (docs/deploy.md, Ports)")
    for i, c in enumerate(doc.get("clients", [])):
        _check(c, CLIENT, f"clients[{i}]", errors)
    names = set()
    for i, lim in enumerate(doc.get("limits", [])):
        _check(lim, LIMIT, f"limits[{i}]", errors)
        if lim.get("name") in names:
            errors.append(f"limits[{i}].name: duplicate policy name {lim.get('name')!r}")
        names.add(lim.get("name"))
        if not any(k in lim for k in ("requests", "tokens", "concurrency")):
            errors.append(f"limits[{i}]: limits nothing (needs requests, tokens or concurrency)")
        if "max_wait" in lim and lim.get("on_limit") != "wait":
            errors.append(f"limits[{i}].max_wait: only with on_limit = \"wait\"")
    # Secrets only by reference; nothing that looks like a key anywhere in the file.
    if re.search(r"\bsk-[A-Za-z0-9_-]{16,}", text):
        errors.append("contains what looks like a literal API key")
    return [f"{name}: {e}" for e in errors], doc


# Ports that applications, Prometheus and its exporters, and service-mesh sidecars commonly
# bind: the deploy kit keeps clear of them, since a pod's containers share one network
# namespace (and a VM host runs Prometheus on 9090).
COMMON_PORTS = frozenset(
    [80, 443, 3000, 3001, 3500, 3501, 4000, 5000, 5432, 6379, 8000, 8008, 8080, 8081, 8443,
     8888, 9000, 9090, 9091, 9093, 9094, 9100, 50001]
    + list(range(4140, 4192))      # Linkerd's proxy
    + list(range(15000, 15091))    # Istio / Envoy
)


def port_of(addr: str) -> int | None:
    """The port of "127.0.0.1:14080" or "[::1]:14080"."""
    tail = addr.rsplit(":", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def kit_ports() -> tuple[int | None, int | None]:
    """(proxy, admin) ports of deploy/config/ezgate.toml: the image's and the VM's."""
    doc = tomllib.loads((Path(__file__).resolve().parent / "config" / "ezgate.toml").read_text())
    server = doc.get("server", {})
    return port_of(server.get("listen", "")), port_of(server.get("admin_listen", ""))


def shutdown_grace(doc: dict) -> float:
    return seconds(doc.get("server", {}).get("shutdown_grace", "30s"))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: check_config.py FILE...", file=sys.stderr)
        return 2
    errors = []
    for f in argv:
        errs, doc = check_text(Path(f).read_text(), f)
        errors += errs
        if not errs and "api_key" not in doc.get("upstream", {}):
            errors.append(f"{f}: upstream.api_key is not set: the deploy kit runs ezgate in managed mode")
    for e in errors:
        print(f"  ERROR {e}", file=sys.stderr)
    print(f"  checked {len(argv)} config file(s): {len(errors)} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
