# i1 (one H200): never-run GPU test (graph captures), then in-process interleaved kernels on the small config.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
echo "== gpu tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_cudagraphs.py 2>&1 | grep -v Warning | tail -8 | tee $OUT/gpu-tests.txt
echo "== interleaved, block graphs"
timeout 200 python3 docs/bench-results/2026-11-29-interleaved_ab.py block 8 40 sdpa_cudnn sdpa_flash sdpa_efficient standard 2>/tmp/ab1.err | tee $OUT/ab-block.jsonl || tail -5 /tmp/ab1.err
echo "== interleaved, whole model compiled, graphs"
timeout 200 python3 docs/bench-results/2026-11-29-interleaved_ab.py whole 8 40 sdpa_cudnn sdpa_flash 2>/tmp/ab2.err | tee $OUT/ab-whole.jsonl || tail -5 /tmp/ab2.err
date -u
python3 - <<'P'
import json,glob
for f in sorted(glob.glob("$OUT/ab-*.jsonl".replace("$OUT", __import__("os").environ["OUT"]))):
    for l in open(f):
        try: d=json.loads(l)
        except Exception: continue
        print(f"{d['scope']:6} {d['kernel']:15} med {d['ms_median']:7.3f} min {d['ms_min']:7.3f} max {d['ms_max']:7.3f} gpu {d['gpu_busy_ms']:7.3f} tok/s {d['tok_s_median']}")
P
