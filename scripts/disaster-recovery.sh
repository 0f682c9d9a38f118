#!/usr/bin/env bash
# The runbook's disaster-recovery.sh, now a thin wrapper around `drctl plan run`.
#
#   scripts/disaster-recovery.sh [--health-only | --backup-only | --test-only] [--plan FILE] [--config FILE] [--json]
#
# No mode flag runs every stage in order. drctl comes from $DRCTL, else PATH; the config from
# --config, else $DRCTL_CONFIG (else drctl's default /etc/drctl/drctl.toml).
set -euo pipefail
DRCTL="${DRCTL:-drctl}"
PLAN="$(cd "$(dirname "$0")/.." && pwd)/restore-plans/pitr.toml"
MODE=()
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --health-only|--backup-only|--test-only)
      if [ ${#MODE[@]} -gt 0 ]; then echo "disaster-recovery.sh: give at most one of --health-only, --backup-only, --test-only" >&2; exit 2; fi
      MODE=("$1"); shift ;;
    --plan) PLAN="$2"; shift 2 ;;
    --config) ARGS+=(--config "$2"); shift 2 ;;
    --json) ARGS+=(--json); shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "disaster-recovery.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
exec "$DRCTL" "${ARGS[@]}" plan run "$PLAN" "${MODE[@]}"
