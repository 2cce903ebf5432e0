# e7 (two H200s): the worker's check beside its model build under FSDP2 and DDP on two GPUs (smoke, small config).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
set -o pipefail
date -u
for s in fsdp ddp; do
  sed "s/scaling: {num_workers: 1, use_gpu: true, cpus_per_worker: 2}/scaling: {num_workers: 2, use_gpu: true, cpus_per_worker: 2, strategy: $s}/" configs/llama-small-gpu.yaml > /tmp/s2-$s.yaml
  timeout 200 python3 -m orchestrator train --config-file /tmp/s2-$s.yaml --max-steps 10 --output-dir /tmp/s2 --name $s > /tmp/s2-$s.log 2>&1; echo "$s rc=$?"
  python3 -c "
import json;s=json.load(open('/tmp/s2/$s/summary.json'));v=s['variants']
v=v[0] if isinstance(v,list) else list(v.values())[0]
print('$s', v.get('status'), v.get('strategy'), v.get('backend'), v.get('tokens_per_s'), (v.get('workers') or [{}])[0].get('preflight_verdict'), s['run'].get('startup_s',{}).get('attention'), s['run'].get('startup_s',{}).get('model_init'))" 2>&1 | tail -1 | tee -a $OUT/smoke.txt
  tail -3 /tmp/s2-$s.log
done
date -u
