# h1 (two H200s): DDP's ceiling on this host: both GPUs training on their own at once, no communication; beside DDP (issue 12).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nvidia-smi topo -m | head -4
timeout 420 python3 -m bench.ddp.candidates $OUT/ddp-h1.json --only 1gpu,independent,1gpu_bf16_master,independent_bf16_master,bf16_master_bucket_400 --rounds 2 --warmup 4 --iters 14 2>&1 | grep -v Warning | grep -E "^\||x of" 
date -u
