# i2 (one H200): reduce-overhead now compiles the whole model: GPU tests, train the small config, then bench its kernels.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
echo "== gpu tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_cudagraphs.py 2>&1 | tail -2 | tee $OUT/gpu-tests.txt
echo "== train, small config"
timeout 200 python3 -m orchestrator train --config-file configs/llama-small-gpu.yaml --max-steps 100 --output-dir /tmp/i2 --name ro > /tmp/i2.log 2>&1; echo "train rc=$?"
grep -iE "flash attention:|tokens/s|error|Traceback" /tmp/i2.log | grep -v "Failed to query" | tail -6
cp /tmp/i2.log $OUT/train-small.log; cp /tmp/i2/ro/summary.json $OUT/train-small-summary.json 2>/dev/null
python3 -c "
import json;s=json.load(open('/tmp/i2/ro/summary.json'));v=s['variants']
v=v if isinstance(v,list) else list(v.values())
for x in v: print(x.get('name'), x.get('status'), x.get('backend'), x.get('compile_mode'), x.get('compile_scope'), round(x.get('tokens_per_s') or 0), x.get('mfu'), x.get('kernel_timings'), x.get('final_loss'))
print('startup', s['run'].get('startup_s'))" 2>&1 | tail -4
echo "== bench, small config, every kernel"
timeout 330 python3 -m orchestrator bench --config-file configs/llama-small-gpu.yaml --skip-kernels --kernels all --repeats 3 --warmup 10 --iters 100 --output-dir /tmp/k 2>&1 | grep -v "Failed to query" | grep -E "^\||seq 1024|fastest|flash|Error" | tee $OUT/small-kernels.txt
cp /tmp/k/bench-*/bench.json $OUT/small-kernels.json 2>/dev/null
date -u
