# call m4 (2026-11-29 05:54-05:56 UTC, one H200): FSDP with train.param_dtype auto and fp32, one
# worker, configs/llama-small-gpu.yaml for 60 steps in the default compile mode (the command as it ran).
# Runs from the repository root on a GPU machine where the project is installed (pip install -e .);
# OUT names a folder for what it keeps (OUT=/tmp/out).
for p in auto fp32; do python3 - $p <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("configs/llama-small-gpu.yaml"))
cfg["train"].update(max_steps=60, param_dtype=sys.argv[1], checkpoint_at_end=False)
cfg["train"].pop("compile_mode", None)
cfg.setdefault("scaling", {})["strategy"] = "fsdp"
yaml.safe_dump(cfg, open(f"/tmp/s-{sys.argv[1]}.yaml", "w"))
PY
timeout 120 python3 -m orchestrator train --config-file /tmp/s-$p.yaml --output-dir $OUT/r --name $p 2>&1 | grep -E "step (1|60)/60|succeeded|failed|rror" | tail -4; python3 -c "import json; v=json.load(open('$OUT/r/$p/summary.json'))['variants']['flash']; print('$p', v['strategy'], v['param_dtype'], v['dtype'], round(v['tokens_per_s']), v['final_loss'], v['peak_mem_bytes']>>20)"; done; rm -rf $OUT/r
