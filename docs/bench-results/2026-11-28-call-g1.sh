# g1 (one H200): CUDA graphs (train.compile_mode reduce-overhead): GPU tests, then train on the small config through Ray.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
echo "== gpu tests"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_cudagraphs.py tests/test_gpu_kernels.py 2>&1 | grep -v Warning | tail -15 | tee $OUT/gpu-tests.txt
echo "== train, small config (reduce-overhead)"
timeout 240 python3 -m orchestrator train --config-file configs/llama-small-gpu.yaml --max-steps 60 --output-dir /tmp/g1 --name ro > /tmp/g1.log 2>&1; echo "train rc=$?"
grep -iE "flash attention|kernels|tokens/s|error|Traceback" /tmp/g1.log | grep -v "Failed to query" | tail -12
cp /tmp/g1.log $OUT/train-small-ro.log; cp /tmp/g1/ro/summary.json $OUT/train-small-ro-summary.json 2>/dev/null
python3 -c "
import json;s=json.load(open('/tmp/g1/ro/summary.json'));v=s['variants']
v=v if isinstance(v,list) else list(v.values())
for x in v: print(x.get('name') or x.get('variant'), x.get('status'), x.get('backend'), x.get('compile_mode'), x.get('tokens_per_s'), x.get('kernel_timings'), x.get('final_loss') or x.get('last_loss'))
print('startup', s['run'].get('startup_s'))" 2>&1 | tail -5
date -u
