# d1 (one H200): startup cold/warm/kept/floor on the final code (issue 14); GPU tests.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; git log --oneline -1 2>/dev/null; python3 -c "import torch,ray;print('torch',torch.__version__,'cuda',torch.version.cuda,'ray',ray.__version__)"; } | tee $OUT/machine.txt
sed 's/  checkpoint_every: 1000/  checkpoint_every: 1000\n  checkpoint_at_end: false/' configs/llama-0.95b.yaml > /tmp/st.yaml
echo "== startup: cold, warm, kept start, kept warm, floor"
timeout 400 python3 -m orchestrator bench --startup --config-file /tmp/st.yaml --output-dir /tmp/st 2>&1 | grep -v "Failed to query" | grep -E "^\||^goal" 
cp /tmp/st/bench-*/bench-startup.json $OUT/ 2>/dev/null; cp /tmp/st/bench-*/bench-startup.md $OUT/ 2>/dev/null
d=$(find /tmp/st -maxdepth 3 -type d -name startup-cold | head -1)
cp $d/preflight.json $OUT/cold-preflight.json 2>/dev/null; cp $d/flash_attention_log.txt $OUT/cold-flash-log.txt 2>/dev/null; tail -1 $d/flash_attention_log.txt
echo "== gpu tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_kernels.py tests/test_gpu_loss.py 2>&1 | tail -3 | tee $OUT/gpu-tests.txt
