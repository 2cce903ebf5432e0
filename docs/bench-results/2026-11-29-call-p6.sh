# p6 (one H200, carry .whl .gpu): DDP + reduce-overhead (whole-model CUDA graphs) on a GPU, two gloo ranks on one GPU.
source .whl/bootstrap.sh >/dev/null 2>&1
source .gpu/env.sh
date -u; python3 -c "import torch;print('torch',torch.__version__)"
timeout 280 python3 docs/bench-results/2026-11-29-ddp-graphs-on-one-gpu.py 2>&1 | grep -v "Warning\|warn(" | tail -12
date -u
