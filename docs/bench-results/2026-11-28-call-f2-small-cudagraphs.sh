# f2 (GPU 0): the small config, each kernel with and without Inductor's CUDA graphs, two rounds.
set -o pipefail
source .whl/bootstrap.sh >/dev/null 2>&1
source .gpu/env.sh
export CUDA_VISIBLE_DEVICES=0
date -u
for r in 1 2; do for mode in default cudagraphs; do for k in standard sdpa_flash sdpa_efficient sdpa_cudnn; do
  timeout 90 python3 .gpu/small_cg.py $k $mode 100 2>/tmp/err-$k-$mode.txt | tee -a $OUT/small-cg.jsonl || tail -3 /tmp/err-$k-$mode.txt
done; done; done
date -u
