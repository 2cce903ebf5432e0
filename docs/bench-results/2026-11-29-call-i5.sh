# i5 (one H200): the small config's whole-model compile, cold and then warm (the same command again): startup phases.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
for run in cold warm; do
  timeout 200 python3 -m orchestrator train --config-file configs/llama-small-gpu.yaml --max-steps 60 --output-dir /tmp/i5 --name $run > /tmp/i5-$run.log 2>&1; echo "$run rc=$?"
  cp /tmp/i5/$run/summary.json $OUT/train-small-$run-summary.json 2>/dev/null
done
python3 - <<'P'
import json
for run in ("cold", "warm"):
    s = json.load(open(f"/tmp/i5/{run}/summary.json")); v = list(s["variants"].values()) if isinstance(s["variants"], dict) else s["variants"]
    st = s["run"]["startup_s"]
    print(run, v[0]["status"], v[0]["backend"], v[0]["compile_scope"], round(v[0]["tokens_per_s"]), "|", " ".join(f"{k}={st[k]}" for k in ("total", "ray_start", "workers_up", "setup", "attention", "model_init", "first_step")))
P
date -u
