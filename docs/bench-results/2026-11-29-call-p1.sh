# p1 (one H200): a worker's setup, piece by piece, in fresh processes.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; python3 -c "import torch;print('torch',torch.__version__,'cuda',torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"; } | tee $OUT/machine.txt
export TORCHINDUCTOR_CACHE_DIR=/tmp/p1-ind
for m in cold plain plain dlopen trainfirst; do
  timeout 240 python3 docs/bench-results/2026-11-29-worker-setup-pieces.py $m 2>&1 | grep -v Warning | tail -2 | tee -a $OUT/p1.txt
done
du -sh /tmp/p1-ind; ls -la /tmp/p1-ind/artifacts
date -u
