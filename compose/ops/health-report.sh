#!/usr/bin/env bash
# Health report of every Seawall sidecar (RUNBOOK.md, "Daily"): run from cron every 6 hours.
# Prints one line per app service — the sidecar's /health status and any breaker that is not closed — and
# exits 1 if any sidecar is unhealthy or unreachable, so cron's mail (or a wrapper) notices.
# The admin ports are those compose publishes on the host's loopback (compose/docker-compose.yml).
set -u
declare -A ports=(
  [data-service]=9911 [regime-detection]=9912 [meta-controller]=9913 [training-orchestrator]=9914
  [risk-manager]=9915 [inference-service]=9916 [forensics-consumer]=9917
)
status=0
echo "seawall health report $(date -u +%Y-%m-%dT%H:%M:%SZ)"
for service in "${!ports[@]}"; do
  body=$(curl -s --max-time 5 "http://127.0.0.1:${ports[$service]}/health") || { echo "$service: UNREACHABLE"; status=1; continue; }
  summary=$(printf '%s' "$body" | python3 -c '
import json, sys
h = json.load(sys.stdin)
bad = [f"{n}={b.get(\"state\")}" for n, b in sorted(h.get("circuit_breakers", {}).items()) if b.get("state") != "closed"]
print(h.get("status", "?"), *bad)')
  echo "$service: $summary"
  [[ $summary == unhealthy* ]] && status=1
done
exit $status
