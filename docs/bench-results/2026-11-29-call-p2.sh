# p2 (one H200): kept-Ray warm starts with and without the workers' preload (alternating),
# then the warm first step profiled, then the preload's CUDA check.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
sed 's/  checkpoint_every: 1000/  checkpoint_every: 1000\n  checkpoint_at_end: false/' configs/llama-0.95b.yaml > /tmp/st.yaml
i=0
for pre in 1 1 0 1 0; do
  i=$((i+1))
  FLASH_ORCHESTRATOR_WORKER_PRELOAD=$pre timeout 200 python3 -m orchestrator train --config-file /tmp/st.yaml --max-steps 2 --keep-ray --output-dir /tmp/p2 --name r$i-pre$pre > /tmp/p2-r$i.log 2>&1; echo "r$i pre=$pre rc=$?"
  cp /tmp/p2/r$i-pre$pre/summary.json $OUT/kept-r$i-pre$pre-summary.json 2>/dev/null
done
python3 -m orchestrator ray-down 2>&1 | tail -1
python3 - <<'P' | tee $OUT/kept-ab.txt
import json, glob
for f in sorted(glob.glob("/tmp/p2/r*/summary.json")):
    s = json.load(open(f)); r = s["run"]; st = r.get("startup_s") or {}; m = r.get("startup_marks") or {}
    b = m.get("command", 0)
    print(f.split("/")[3], " ".join(f"{k}={st.get(k)}" for k in ("total", "ray_start", "preflight_and_plan", "workers_up", "worker_process", "worker_init", "setup", "attention", "model_init", "first_step")),
          "| marks:", " ".join(f"{k}={round(v-b,2)}" for k, v in sorted(m.items(), key=lambda kv: kv[1])))
P
timeout 200 python3 docs/bench-results/2026-11-29-first-step-profile.py plain 2>&1 | grep -v Warn | tail -1 | tee $OUT/p2.txt
timeout 200 python3 docs/bench-results/2026-11-29-first-step-profile.py profile 2>&1 | grep -v Warn > $OUT/p2-profile.txt; head -3 $OUT/p2-profile.txt
timeout 250 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_preload.py 2>&1 | tail -3
date -u
