# call m1 (2026-11-29): train.param_dtype bf16 on one GPU: the GPU tests, then the ~0.95B config
# through bench's sweep (bare process, baseline then bf16 weights, one process).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
date -u
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_master_weights.py 2>&1 | tail -4
date -u
timeout 330 python3 -m orchestrator bench --config-file configs/llama-0.95b.yaml --skip-kernels --variants flash \
  --sweep train.param_dtype=bf16 --warmup 10 --iters 40 --output-dir $OUT/bench 2>&1 | tail -12
cp $OUT/bench/*/bench.json $OUT/m1-sweep.json 2>/dev/null
date -u
