# c1 (same x2 machine, warm; the corpus in .corp/data: python3 -m bench.corpus .corp): the workers' setup hook A/B on kept-Ray warm runs (issue 14),
# then float8 against bf16 over 200 steps on a corpus that does not repeat (issue 15); GPU 0 only.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
export CUDA_VISIBLE_DEVICES=0
[ -f /tmp/st.yaml ] || sed 's/  checkpoint_every: 1000/  checkpoint_every: 1000\n  checkpoint_at_end: false/' configs/llama-0.95b.yaml > /tmp/st.yaml
T="python3 -m orchestrator train --config-file /tmp/st.yaml --keep-ray --max-steps 3 --output-dir /tmp/ab"
echo "== setup hook A/B, kept Ray warm"
timeout 90 $T --name ab0 > /tmp/ab0.log 2>&1; tail -1 /tmp/ab0.log
for i in 1 2; do
  FLASH_ORCHESTRATOR_WORKER_PRELOAD=1 timeout 90 $T --name on$i > /tmp/on$i.log 2>&1
  FLASH_ORCHESTRATOR_WORKER_PRELOAD=0 timeout 90 $T --name off$i > /tmp/off$i.log 2>&1
done
python3 -m orchestrator ray-down | tail -1
python3 - <<'PY' | tee $OUT/preload-ab.txt
import json, glob, os
for n in ("ab0", "on1", "off1", "on2", "off2"):
    try:
        s = json.load(open(f"/tmp/ab/{n}/summary.json")); st = s["run"]["startup_s"] or {}
        print(n, {k: st.get(k) for k in ("total", "ray_start", "workers_up", "worker_process", "worker_init", "setup", "attention", "model_init", "first_step")})
    except Exception as e:
        print(n, "no summary", e)
PY
cp /tmp/ab/on1/summary.json $OUT/preload-on1-summary.json 2>/dev/null
cp configs/llama-0.95b.yaml /tmp/f8.yaml; printf 'data:\n  path: %s/.corp/data\n' "$PWD" >> /tmp/f8.yaml
echo "== bench --float8-check --steps 200 (corpus: $(python3 -c "import json;m=json.load(open('.corp/data/meta.json'));print(m['num_tokens'])" | cut -c1-120))"
timeout 420 python3 -m orchestrator bench --config-file /tmp/f8.yaml --skip-kernels --variants flash --float8-check --steps 200 --output-dir /tmp/f8 2>&1 | grep -v "Failed to query" | tail -12
cp /tmp/f8/bench-*/bench.json $OUT/float8-check.json 2>/dev/null; cp /tmp/f8/bench-*/bench.md $OUT/float8-check.md 2>/dev/null
