# p4 (one H200): kept-Ray starts with the bytecode cache off, then on (A/B in one lease).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; env | grep PYTHONDONTWRITE; } | tee $OUT/machine.txt
sed 's/  checkpoint_every: 1000/  checkpoint_every: 1000\n  checkpoint_at_end: false/' configs/llama-0.95b.yaml > /tmp/st.yaml
for arm in off on; do
  sw=$([ $arm = off ] && echo 0 || echo "")
  for i in 1 2 3; do
    FLASH_ORCHESTRATOR_BYTECODE_CACHE=$sw timeout 200 python3 -m orchestrator train --config-file /tmp/st.yaml --max-steps 2 --keep-ray --output-dir /tmp/p4 --name $arm-$i > /tmp/p4-$arm-$i.log 2>&1; echo "$arm-$i rc=$?"
    cp /tmp/p4/$arm-$i/summary.json $OUT/kept-$arm-$i-summary.json 2>/dev/null
  done
  python3 -m orchestrator ray-down 2>&1 | tail -1
done
grep -h "compiled bytecode" /tmp/p4-on-1.log | head -2
du -sh ~/.cache/flash-orchestrator/pycache 2>/dev/null
python3 - <<'P' | tee $OUT/kept-ab.txt
import json, glob
for arm in ("off", "on"):
    for i in (1, 2, 3):
        s = json.load(open(f"/tmp/p4/{arm}-{i}/summary.json")); r = s["run"]; st = r.get("startup_s") or {}; m = r.get("startup_marks") or {}
        b = m.get("command", 0)
        print(f"{arm}-{i}", " ".join(f"{k}={st.get(k)}" for k in ("total", "ray_start", "preflight_and_plan", "workers_up", "worker_process", "worker_init", "setup", "attention", "model_init", "first_step")),
              "| marks:", " ".join(f"{k}={round(v-b,2)}" for k, v in sorted(m.items(), key=lambda kv: kv[1])))
P
date -u
