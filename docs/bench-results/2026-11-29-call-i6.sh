# i6 (one H200): --run-both-models on the small config (whole-model CUDA graphs): the flash and the standard variant through train.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda)"; } | tee $OUT/machine.txt
timeout 190 python3 -m orchestrator train --config-file configs/llama-small-gpu.yaml --run-both-models --max-steps 200 --output-dir /tmp/i6 --name both > /tmp/i6.log 2>&1; echo "rc=$?"
cp /tmp/i6.log $OUT/train-both.log; cp /tmp/i6/both/summary.json $OUT/train-both-summary.json 2>/dev/null; cp /tmp/i6/both/plan.json $OUT/train-both-plan.json 2>/dev/null
grep -E "^  (flash|standard):" /tmp/i6.log | tail -3
python3 -c "
import json;s=json.load(open('/tmp/i6/both/summary.json'))
for n,x in s['variants'].items(): print(n, x.get('status'), x.get('backend'), x.get('compile_scope'), round(x.get('tokens_per_s') or 0), x.get('mfu'))
print(s['run'].get('schedule') or s['run'].get('placement'))" 2>&1 | tail -4
date -u
