# a1 (x2): startup cold/warm/kept/floor on GPU 0 (issue 14), with the
# probe's kernel timing beside the workers' start. Prints a short table last.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
python3 -c 'import liger_kernel' 2>/dev/null || python3 -m pip install -q liger-kernel
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch,ray;print('torch',torch.__version__,'cuda',torch.version.cuda,'ray',ray.__version__)"; } | tee $OUT/machine.txt
sed 's/  checkpoint_every: 1000/  checkpoint_every: 1000\n  checkpoint_at_end: false/' configs/llama-0.95b.yaml > /tmp/st.yaml; grep -c checkpoint_at_end /tmp/st.yaml
echo "== startup on GPU 0: cold, warm, kept start, kept warm, floor"
CUDA_VISIBLE_DEVICES=0 timeout 450 python3 -m orchestrator bench --startup --config-file /tmp/st.yaml --output-dir /tmp/st 2>&1 | grep -v "Failed to query" | tail -24
cp /tmp/st/bench-*/bench-startup.json $OUT/ 2>/dev/null; cp /tmp/st/bench-*/bench-startup.md $OUT/ 2>/dev/null
d=$(ls -d /tmp/st/startup-cold 2>/dev/null || find /tmp/st -maxdepth 3 -type d -name startup-cold | head -1)
cp $d/preflight.json $OUT/cold-preflight.json 2>/dev/null; cp $d/flash_attention_log.txt $OUT/cold-flash-log.txt 2>/dev/null
echo "== cold run's log and worker attention"
tail -4 $d/flash_attention_log.txt 2>/dev/null
python3 - <<'PY'
import json, glob
for label in ("cold", "warm", "kept_start", "kept"):
    for p in glob.glob(f"/tmp/st/**/startup-{label}/summary.json", recursive=True)[:1]:
        s = json.load(open(p)); v = next(iter(s["variants"].values()))
        w = (v.get("workers") or [{}])[0]
        print(label, "backend", v.get("backend"), "timings", v.get("kernel_timings"), "verdict", w.get("preflight_verdict"))
        print("  startup", s["run"].get("startup_s"))
PY
