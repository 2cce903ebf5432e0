# g4 (same machine, warm): the small config's kernels under CUDA graphs again (bench, 3 rounds); then the ~0.95B with and without CUDA graphs (issue 15).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u
timeout 200 python3 -m orchestrator bench --config-file configs/llama-small-gpu.yaml --skip-kernels --kernels all --repeats 3 --warmup 10 --iters 100 --output-dir /tmp/k4 2>&1 | grep -v "Failed to query" | grep -E "^\||fastest|the flash variant" | tee $OUT/small-kernels-ro-2.txt
cp /tmp/k4/bench-*/bench.json $OUT/small-kernels-ro-2.json 2>/dev/null
sed 's/^  checkpoint_at_end: .*//' configs/llama-0.95b.yaml > /tmp/b.yaml
timeout 330 python3 -m orchestrator bench --config-file configs/llama-0.95b.yaml --skip-kernels --variants flash --warmup 8 --iters 20 --sweep train.compile_mode=reduce-overhead --output-dir /tmp/k5 2>&1 | grep -v "Failed to query" | grep -E "^\||sweep|Error|error" | tee $OUT/b095-ro-sweep.txt
cp /tmp/k5/bench-*/bench.json $OUT/b095-ro-sweep.json 2>/dev/null
date -u
