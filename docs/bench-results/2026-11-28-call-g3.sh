# g3 (same machine, warm): the small config's timers at depths 2 and 8 under CUDA graphs, beside training with each kernel forced (issue 15).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u
timeout 400 python3 -m bench.kernel_timers configs/llama-small-gpu.yaml $OUT/small-timers-ro.json --depths 2,8 --rounds 2 --kernels sdpa_flash,sdpa_cudnn,sdpa_efficient,standard 2>&1 | grep -v Warning | tee $OUT/small-timers-ro.txt | grep -E "^\||chooses|Error"
date -u
