# i4 (one H200): the GPU tests of the whole-model graphs, then train the small config through Ray.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
echo "== gpu tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_cudagraphs.py tests/test_gpu_kernels.py 2>&1 | grep -E "passed|failed|^E " | head -12 | tee $OUT/gpu-tests.txt
echo "== train, small config"
timeout 200 python3 -m orchestrator train --config-file configs/llama-small-gpu.yaml --max-steps 200 --output-dir /tmp/i4 --name ro > /tmp/i4.log 2>&1; echo "train rc=$?"
grep -iE "flash attention:|error|Traceback" /tmp/i4.log | grep -v "Failed to query" | tail -4
cp /tmp/i4.log $OUT/train-small.log; cp /tmp/i4/ro/summary.json $OUT/train-small-summary.json 2>/dev/null
python3 -c "
import json;s=json.load(open('/tmp/i4/ro/summary.json'));v=s['variants']
v=v if isinstance(v,list) else list(v.values())
for x in v: print(x.get('status'), x.get('backend'), x.get('compile_mode'), x.get('compile_scope'), round(x.get('tokens_per_s') or 0), x.get('mfu'), x.get('kernel_timings'), x.get('first_loss'), x.get('final_loss'))
print('startup', s['run'].get('startup_s'))" 2>&1 | tail -4
date -u
