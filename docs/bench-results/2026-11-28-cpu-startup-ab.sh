#!/usr/bin/env bash
# The A/B behind docs/BENCHMARKS.md, "2026-11-28 11:20-11:52 UTC" (CPU): `train --max-steps 1`
# from two trees, alternating, with one shared (warm) preflight cache; medians of the startup
# marks from each summary.json. Usage: BASE=<checkout of the earlier commit> bash this N
set -u
export FLASH_ORCHESTRATOR_PREFLIGHT_CACHE=${CACHE:-/tmp/ab/pcache} RAY_USAGE_STATS_ENABLED=0
NEW=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/ab/runs}
mkdir -p "$OUT"
for i in $(seq 1 "${1:-3}"); do
  for side in base new; do
    root=$BASE; [ $side = new ] && root=$NEW
    rm -rf "$OUT/$side-$i"
    (cd /tmp && PYTHONPATH=$root python -m orchestrator train --max-steps 1 --output-dir "$OUT/$side-$i" > "$OUT/$side-$i.log" 2>&1)
    echo "$side $i rc=$?"
  done
done
OUT=$OUT python - <<'PY'
import glob, json, os, statistics as st
rows = {}
for f in sorted(glob.glob(os.environ["OUT"] + "/*/*/summary.json")):
    side = f.split("/")[-3].split("-")[0]
    run = json.load(open(f))["run"]
    rows.setdefault(side, []).append({"workers_up": run["startup_s"]["workers_up"], "total": run["startup_s"]["total"]})
for side, rs in rows.items():
    print(side, len(rs), {k: round(st.median(r[k] for r in rs), 2) for k in rs[0]})
PY
