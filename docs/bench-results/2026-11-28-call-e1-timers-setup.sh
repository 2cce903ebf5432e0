# e1 (one H200): worker setup profile (issue 14); kernel timers vs end to end on the small config (issue 15).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
echo "== setup profile"; timeout 90 python3 docs/bench-results/2026-11-28-worker-setup-profile.py 2>&1 | tail -2 | tee $OUT/setup-profile.txt
echo "== small config timers"
timeout 420 python3 -m bench.kernel_timers configs/llama-small-gpu.yaml $OUT/small-timers.json --depths 0,1,2,8 --rounds 3 2>&1 | grep -v Warning | tee $OUT/small-timers.txt | grep -E "^\||chooses|not a candidate|Error"
date -u
