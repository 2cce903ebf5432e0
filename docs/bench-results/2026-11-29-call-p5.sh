# p5 (one H200): bench --startup (cold, warm, kept start, kept warm, floor) with the bytecode cache.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch,ray;print('torch',torch.__version__,'cuda',torch.version.cuda,'ray',ray.__version__)"; } | tee $OUT/machine.txt
sed 's/  checkpoint_every: 1000/  checkpoint_every: 1000\n  checkpoint_at_end: false/' configs/llama-0.95b.yaml > /tmp/st.yaml
timeout 560 python3 -m orchestrator bench --startup --config-file /tmp/st.yaml --output-dir /tmp/st 2>&1 | grep -v "Failed to query" | grep -E "^\||^goal"
cp /tmp/st/bench-*/bench-startup.json $OUT/ 2>/dev/null; cp /tmp/st/bench-*/bench-startup.md $OUT/ 2>/dev/null
date -u
