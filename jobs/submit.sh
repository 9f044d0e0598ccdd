#!/usr/bin/env bash
# Submit an audit to a running Ray cluster as a Ray job, and wait for it.
#
#   RAY_ADDRESS=http://HEAD:8265 jobs/submit.sh [CONFIG.toml] [-- extra `audit run` flags]
#
# The config's folder is uploaded as the job's working directory (keep it small), so the file
# travels with the job; its paths (data_dir, model, weights, out, baseline) must be absolute and valid
# on the cluster's head node, where the job's driver runs: the upload is a temporary copy. The cluster's image must have cam-audit installed. Exits
# with the job's result: 0 when it succeeded (the audit passed its --fail-on gate), else 1.
# Needs `pip install 'cam-audit[jobs]'` (ray[default]) where it runs.
set -euo pipefail
config=${1:-jobs/ham10000.toml}
shift $(( $# > 0 ? 1 : 0 ))
[ "${1:-}" = "--" ] && shift
[ -f "$config" ] || { echo "error: config file not found: $config" >&2; exit 2; }
exec ray job submit \
  --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" \
  --working-dir "$(dirname "$config")" \
  --submission-id "cam-audit-$(date -u +%Y%m%d-%H%M%S)-$$" \
  -- audit run --config "$(basename "$config")" "$@"
