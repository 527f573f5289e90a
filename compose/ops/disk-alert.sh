#!/usr/bin/env bash
# Hourly disk check (RUNBOOK.md, "Daily"): warn when the filesystem holding Docker's data reaches the
# threshold (default 90 %). Prints the usage and exits 1 at or above it, so cron's mail (or a wrapper) notices.
set -u
threshold=${DISK_ALERT_THRESHOLD:-90}
target=${DOCKER_DATA_ROOT:-/var/lib/docker}
[[ -e $target ]] || target=/   # no Docker data root here: check the root filesystem
used=$(df --output=pcent "$target" | tail -1 | tr -dc '0-9')
if (( used >= threshold )); then
  echo "DISK ALERT: $target is ${used}% full (threshold ${threshold}%) — see RUNBOOK.md, 'Disk space exhaustion'"
  exit 1
fi
echo "disk ok: $target ${used}%"
