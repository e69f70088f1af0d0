#!/usr/bin/env bash
# The whole test suite while the quickstart runs again and again beside it, on one machine:
# issue #22's load proof. Writes OUT/suite.log, OUT/quickstart.log and OUT/summary.txt.
#
#   scripts/suite_beside_quickstart.sh [OUT]        # OUT defaults to /tmp/kdserve-load-proof
#
# The quickstart loop waits for port 9000 (its teacher's) to be free before each run, and is
# stopped with SIGKILL once the suite ends (the run in flight is not counted).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/kdserve-load-proof}
# the KubeRay CRDs of the k8s/ tests, where .ci/run finds them; without them those tests skip
CRDS="$(cd .. && pwd)/shared/k8s/kuberay-crds-v1.7.0"
if [ -z "${KDSERVE_KUBERAY_CRDS:-}" ] && [ -d "$CRDS" ]; then export KDSERVE_KUBERAY_CRDS="$CRDS"; fi
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
: > "$OUT/quickstart.log"

quickstarts() {
  local i=0
  while true; do
    i=$((i + 1))
    while ss -ltn | grep -q ":9000 "; do sleep 2; done
    echo "=== quickstart $i start $(date -u +%T)"
    "$PY" distill_job.py --config configs/quickstart.yaml --set "run.name=load_proof_$i" \
      --set "run.storage_path=$OUT/runs" > "$OUT/quickstart_$i.out" 2>&1
    echo "=== quickstart $i rc $? end $(date -u +%T) lines $(wc -l < "$OUT/quickstart_$i.out")"
    sleep 5
  done >> "$OUT/quickstart.log"
}

quickstarts &
loop=$!
sleep 20  # the first quickstart is starting its cluster when the suite starts its own
start=$(date +%s)
echo "suite start $(date -u +%T)" > "$OUT/summary.txt"
"$PY" -m pytest -q -p no:cacheprovider > "$OUT/suite.log" 2>&1
rc=$?
echo "suite end $(date -u +%T) rc=$rc wall=$(( $(date +%s) - start )) s: $(tail -1 "$OUT/suite.log")" >> "$OUT/summary.txt"
kill "$loop" 2>/dev/null
pkill -9 -f "run.name=load_proof_" 2>/dev/null
grep "rc " "$OUT/quickstart.log" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $rc
