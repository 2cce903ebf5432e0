# call m2 (2026-11-29): the ~0.95B config through `train`, 200 steps on a corpus the steps do not
# repeat (.corp/data, python3 -m bench.corpus .corp --max-mb 20): fp32 weights under autocast,
# bf16 weights with fp32 masters, and fp32 at seed + 1 (the seed-to-seed spread). One kept Ray.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
export FLASH_ORCHESTRATOR_STATE_DIR=/tmp/orch-state
date -u
[ -z "$RUNS" ] && timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_master_weights.py 2>&1 | grep -E "^E  |passed|failed" | head -12
date -u
for run in ${RUNS:-fp32 bf16}; do
  python3 - "$run" <<'PY'
import sys, yaml
run = sys.argv[1]
cfg = yaml.safe_load(open("configs/llama-0.95b.yaml"))
cfg["data"] = {"path": ".corp/data"}
cfg["train"].update(max_steps=200, log_every=1, checkpoint_at_end=False,
                    param_dtype="bf16" if run == "bf16" else "fp32", seed=1338 if run == "fp32_seed1" else 1337)
yaml.safe_dump(cfg, open(f"/tmp/{run}.yaml", "w"))
PY
  timeout $([ $run = fp32 ] && echo 180 || echo 150) python3 -m orchestrator train --config-file /tmp/$run.yaml --keep-ray --output-dir $OUT/runs --name $run 2>&1 \
    | grep -E "step (1|100|200)/200|param|Flash attention:|error|Error|succeeded|failed" | tail -8
  date -u
done
[ -n "$DOWN" ] && python3 -m orchestrator ray-down 2>&1 | tail -1
python3 - <<'PY'
import json, os, statistics
out = os.environ["OUT"]
print("| run | param_dtype | tok/s | MFU | peak GiB | loss, mean of steps 191-200 |")
for run in ("fp32", "bf16", "fp32_seed1"):
    try:
        s = json.load(open(f"{out}/runs/{run}/summary.json"))["variants"]["flash"]
        rows = [json.loads(l) for l in open(f"{out}/runs/{run}/flash/metrics.jsonl")]
        last = statistics.fmean(r["loss"] for r in rows if r["step"] > 190)
        print(f"| {run} | {s.get('param_dtype')} | {s['tokens_per_s']:,.0f} | {s.get('mfu')} | {s['peak_mem_bytes']/2**30:.1f} | {last:.4f} |")
    except Exception as e:
        print(run, "missing:", e)
PY
