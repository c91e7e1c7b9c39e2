#!/usr/bin/env bash
# Checks the operator kit under deploy/:
#   1. the Grafana dashboard is valid JSON and every panel has PromQL in targets[].expr;
#   2. `promtool check rules` on the alerting rules;
#   3. `promtool test rules` on their unit tests;
#   4. every dashboard expression, written into a temporary file of recording rules, through
#      `promtool check rules`, so Prometheus's own parser proves that each one parses.
# Needs python3 (standard library only) and promtool (Debian: apt-get install prometheus).
# Without promtool it exits 1, or 0 with SEGMENTD_SKIP_PROMTOOL=1 (after step 1).
# That every metric the dashboard and the rules name is one a running daemon exports is checked
# against a live scrape by the integration test
# processes::the_dashboard_and_the_alerts_name_only_metrics_a_live_daemon_exports (make test).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dashboard="$root/deploy/grafana/segmentd.json"
rules="$root/deploy/prometheus/segmentd-alerts.yml"
rule_tests="$root/deploy/prometheus/segmentd-alerts.test.yml"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== dashboard: $dashboard"
python3 - "$dashboard" "$rules" "$tmp/dashboard-rules.yml" <<'PY'
import json
import sys

dashboard_path, rules_path, out_path = sys.argv[1:4]

errors = []

with open(dashboard_path) as f:
    dashboard = json.load(f)

for key in ("title", "uid", "panels", "templating", "schemaVersion"):
    if key not in dashboard:
        errors.append(f"dashboard: no {key!r}")
variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
for name in ("datasource", "instance"):
    if name not in variables:
        errors.append(f"dashboard: no template variable {name!r}")


def walk(panels):
    for panel in panels:
        yield panel
        yield from walk(panel.get("panels", []))  # panels inside collapsed rows


exprs = []
ids = set()
for panel in walk(dashboard.get("panels", [])):
    pid = panel.get("id")
    if pid in ids:
        errors.append(f"panel id {pid} used twice")
    ids.add(pid)
    if panel.get("type") == "row":
        continue
    title = panel.get("title", "?")
    targets = panel.get("targets", [])
    if not targets:
        errors.append(f"panel {pid} {title!r}: no targets")
    for target in targets:
        expr = (target.get("expr") or "").strip()
        ref = target.get("refId", "?")
        if not expr:
            errors.append(f"panel {pid} {title!r} target {ref}: empty expr")
            continue
        exprs.append((pid, ref, title, expr))

if errors:
    print("\n".join("  " + e for e in errors), file=sys.stderr)
    sys.exit(1)

# Every expression as a recording rule: JSON is YAML, and promtool parses each `expr`.
rules = [{"record": f"segmentd_dashboard:panel_{pid}_{ref}", "expr": expr} for pid, ref, _, expr in exprs]
with open(out_path, "w") as f:
    json.dump({"groups": [{"name": "segmentd-dashboard-expressions", "rules": rules}]}, f, indent=2)
print(f"  {len(ids)} panels and rows, {len(exprs)} expressions")
PY

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not found: install it (Debian: apt-get install prometheus) to check the rules," >&2
    echo "their tests and the dashboard's PromQL." >&2
    if [[ "${SEGMENTD_SKIP_PROMTOOL:-}" == "1" ]]; then
        echo "SEGMENTD_SKIP_PROMTOOL=1: skipping the promtool checks." >&2
        exit 0
    fi
    echo "Set SEGMENTD_SKIP_PROMTOOL=1 to skip them." >&2
    exit 1
fi

echo "== $(promtool --version 2>&1 | head -n 1)"
echo "== promtool check rules (alerts)"
promtool check rules "$rules"
echo "== promtool test rules"
promtool test rules "$rule_tests"
echo "== promtool check rules (every dashboard expression)"
promtool check rules "$tmp/dashboard-rules.yml"
echo "deploy checks passed"
