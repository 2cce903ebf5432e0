# f1 (two H200s): DDP on two GPUs: bf16 masters with fewer, later all-reduces; two rounds.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch;print(torch.__version__, torch.cuda.nccl.version())"
timeout 540 python3 -m bench.ddp.candidates $OUT/ddp-f1.json --only 1gpu,1gpu_bf16_master,bf16_master,one_bucket,bf16_master_one_bucket,bf16_master_bucket_400,bf16_master_proto_simple --rounds 2 --warmup 4 --iters 14 2>&1 | grep -v Warning | tail -40
date -u
