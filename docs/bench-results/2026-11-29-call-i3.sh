# i3 (one H200): grad accumulation under whole-model graphs (diagnosis), then the small config's kernels timed back to back.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
echo "== grad accumulation"
timeout 240 python3 docs/bench-results/2026-11-29-grad_accum_graphs.py 2>/tmp/ga.err | tee $OUT/ga.jsonl || tail -5 /tmp/ga.err
echo "== bench, small config, every kernel (steps back to back)"
timeout 330 python3 -m orchestrator bench --config-file configs/llama-small-gpu.yaml --skip-kernels --kernels all --repeats 3 --warmup 10 --iters 200 --output-dir /tmp/k3 2>&1 | grep -v "Failed to query" | grep -E "^\||seq 1024|fastest|Error" | grep -v unavailable | tee $OUT/small-kernels.txt
cp /tmp/k3/bench-*/bench.json $OUT/small-kernels.json 2>/dev/null
date -u
