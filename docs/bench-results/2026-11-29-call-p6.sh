# p6 (one H200): DDP + reduce-overhead (whole-model CUDA graphs) on a GPU, two gloo ranks on one GPU.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
date -u; python3 -c "import torch;print('torch',torch.__version__)"
timeout 280 python3 docs/bench-results/2026-11-29-ddp-graphs-on-one-gpu.py 2>&1 | grep -v "Warning\|warn(" | tail -12
date -u
