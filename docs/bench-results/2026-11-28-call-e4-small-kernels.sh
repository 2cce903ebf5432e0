# e4 (same machine, warm): the small config's kernels through the timed choice, 100 steps x 3 rounds (issue 15); GPU tests.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u
timeout 330 python3 -m orchestrator bench --config-file configs/llama-small-gpu.yaml --skip-kernels --kernels all --repeats 3 --warmup 10 --iters 100 --output-dir /tmp/k 2>&1 | grep -v "Failed to query" | grep -E "^\||seq 1024|fastest" | tee $OUT/small-kernels.txt
cp /tmp/k/bench-*/bench.json $OUT/small-kernels.json 2>/dev/null
echo "== gpu tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_kernels.py tests/test_gpu_loss.py 2>&1 | tail -3 | tee $OUT/gpu-tests.txt
date -u
