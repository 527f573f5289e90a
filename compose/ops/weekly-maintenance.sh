#!/usr/bin/env bash
# Weekly maintenance (RUNBOOK.md, "Weekly"); run from the repository root, Sunday 04:00 by cron.
# Safe while the stack runs: nothing here restarts a service.
set -euo pipefail
export COMPOSE_FILE=${COMPOSE_FILE:-compose/docker-compose.yml}
echo "== container state, restarts"
docker compose ps
docker inspect --format '{{.Name}} restarts={{.RestartCount}}' $(docker compose ps -q)
echo "== disk"
df -h /var/lib/docker
docker system df
echo "== prune dangling images and build cache older than a week"
docker image prune -f --filter until=168h
docker builder prune -f --filter until=168h
echo "== TimescaleDB: vacuum/analyse statistics"
docker compose exec -T timescaledb sh -c 'vacuumdb -U "$POSTGRES_USER" -d "$POSTGRES_DB" --analyze-only --quiet'
echo "== Kafka: under-replicated partitions (expect none)"
docker compose exec -T kafka kafka-topics --bootstrap-server 127.0.0.1:29092 --describe --under-replicated-partitions
echo "== Redis: memory and evictions"
docker compose exec -T redis redis-cli info memory | grep -E '^(used_memory_human|maxmemory_human|mem_fragmentation_ratio)'
docker compose exec -T redis redis-cli info stats | grep -E '^evicted_keys'
echo "== last checkpoint cleanup report"
docker compose exec -T checkpoint-cleanup cat /archive/reports/last-run.json || echo "no report yet"
echo "== sidecar policies still valid"
docker compose exec -T data-service-sidecar sidecar check /etc/seawall/policy.yaml
echo "== sidecar health"
"$(dirname "$0")/health-report.sh"
