# g2 (same machine, warm): the small config's kernels under CUDA graphs, through the timed choice, 100 steps x 3 rounds (issue 15).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u
timeout 500 python3 -m orchestrator bench --config-file configs/llama-small-gpu.yaml --skip-kernels --kernels all --repeats 3 --warmup 10 --iters 100 --output-dir /tmp/k 2>&1 | grep -v "Failed to query" | grep -E "^\||seq 1024|fastest|flash|Error" | tee $OUT/small-kernels-ro.txt
cp /tmp/k/bench-*/bench.json $OUT/small-kernels-ro.json 2>/dev/null
date -u
