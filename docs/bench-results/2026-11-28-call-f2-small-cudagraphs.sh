# f2 (GPU 0): the small config, each kernel with and without Inductor's CUDA graphs, two rounds.
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
export CUDA_VISIBLE_DEVICES=0
date -u
for r in 1 2; do for mode in default cudagraphs; do for k in standard sdpa_flash sdpa_efficient sdpa_cudnn; do
  timeout 90 python3 docs/bench-results/2026-11-28-small_cg.py $k $mode 100 2>/tmp/err-$k-$mode.txt | tee -a $OUT/small-cg.jsonl || tail -3 /tmp/err-$k-$mode.txt
done; done; done
date -u
