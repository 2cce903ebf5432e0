# e5 (same machine, warm): the ~0.95B config's kernels through the timed choice (whole blocks), one round (issue 15).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u
timeout 560 python3 -m orchestrator bench --config-file configs/llama-0.95b.yaml --skip-kernels --kernels sdpa_cudnn,sdpa_flash,sdpa_efficient --warmup 5 --iters 20 --output-dir /tmp/k95 2>&1 | grep -v "Failed to query" | grep -E "^\||seq 4096|fastest|timed" | tee $OUT/b095-kernels.txt
cp /tmp/k95/bench-*/bench.json $OUT/b095-kernels.json 2>/dev/null
date -u
