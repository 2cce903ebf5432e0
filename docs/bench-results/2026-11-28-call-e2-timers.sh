# e2 (one H200): small config timers vs end to end with 100 timed steps; 0.95B timers at depth 0 and 16 (issue 15).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u | tee $OUT/machine.txt
echo "== small config"
timeout 250 python3 -m bench.kernel_timers configs/llama-small-gpu.yaml $OUT/small-timers-100.json --depths 0,2,8 --rounds 3 --warmup 10 --iters 100 --kernels sdpa_cudnn,sdpa_flash,sdpa_efficient,standard 2>&1 | grep -v Warning | tee $OUT/small-timers-100.txt | grep -E "^\||chooses|Error"
echo "== 0.95B timers"
timeout 300 python3 -m bench.kernel_timers configs/llama-0.95b.yaml $OUT/b095-timers.json --depths 0,4,16 --rounds 0 --kernels sdpa_cudnn,sdpa_flash,sdpa_efficient 2>&1 | grep -v Warning | tee $OUT/b095-timers.txt | grep -E "^\||timer depth|Error"
date -u
