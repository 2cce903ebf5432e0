#!/usr/bin/env bash
# Two Ray nodes on one host, each taking the variant its preflight verdict allows.
#
#   bench/two-nodes-one-host.sh [CONFIG]     (default configs/llama-small-gpu.yaml)
#
# The head gets GPU 0; a second node gets GPU 1 and a planted `flash_attn` whose import
# segfaults, as an ABI-broken wheel does. `train --run-both-models` against that cluster must
# judge the second node `standard` in preflight, put the flash variant on the head and the
# standard variant on the second node, and run them at once. Both nodes are started and stopped
# with cluster/ray-node.sh (never `ray stop`). Ports: the Ray Client port must lie outside Ray's
# worker port range (10002-19999 by default), or `ray start` refuses it.
#
# Environment: NODE_CPUS (8), NODE_GPUS (1; 0 to try it on a CPU machine with a CPU config),
# OUT (where summary.json and preflight.json are copied; default /tmp/two-nodes-out).
set -uo pipefail
cd "$(dirname "$0")/.."
config="${1:-configs/llama-small-gpu.yaml}"
out="${OUT:-/tmp/two-nodes-out}"; mkdir -p "$out"
work="$(mktemp -d /tmp/two-nodes.XXXX)"
mkdir -p "$work/broken/flash_attn"
printf 'import ctypes\nctypes.string_at(0)  # segfault on import\n' > "$work/broken/flash_attn/__init__.py"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$work/token" FO_START_TIMEOUT=150 FO_STOP_TIMEOUT=30 NCCL_NVLS_ENABLE=0
python3 -c "import secrets; print(secrets.token_hex(32))" > "$work/token"
common=(--node-ip-address=127.0.0.1 "--num-cpus=${NODE_CPUS:-8}" "--num-gpus=${NODE_GPUS:-1}")
stop() { FO_STATE_DIR="$work/w" cluster/ray-node.sh stop; FO_STATE_DIR="$work/h" cluster/ray-node.sh stop; }
trap stop EXIT
CUDA_VISIBLE_DEVICES=0 FO_STATE_DIR="$work/h" cluster/ray-node.sh head --port=6391 --dashboard-port=8291 \
  --ray-client-server-port=23001 --temp-dir="$work/rt-h" "${common[@]}" || exit 1
CUDA_VISIBLE_DEVICES=1 FO_STATE_DIR="$work/w" PYTHONPATH="$work/broken:${PYTHONPATH:-}" FO_EXTRA_LABELS=fo-test-node=second \
  cluster/ray-node.sh join 127.0.0.1:6391 --dashboard-agent-listen-port=52401 --dashboard-agent-grpc-port=52402 \
  --runtime-env-agent-port=52403 --metrics-export-port=52404 --node-manager-port=52405 --object-manager-port=52406 \
  --min-worker-port=53000 --max-worker-port=53100 --temp-dir="$work/rt-w" "${common[@]}" || exit 1
python3 -m orchestrator train --address 127.0.0.1:6391 --config-file "$config" --run-both-models \
  --output-dir "$work/runs" --name two-nodes
code=$?
cp "$work/runs/two-nodes/summary.json" "$work/runs/two-nodes/preflight.json" "$out/" 2>/dev/null
python3 - "$work/runs/two-nodes" <<'PY'
import json, sys
run = sys.argv[1]
s, p = json.load(open(f"{run}/summary.json")), json.load(open(f"{run}/preflight.json"))
for n in p["nodes"]:
    v = n["verdict"]
    print(f"node {n['node_id'][:8]} ({n.get('labels', {}).get('fo-test-node', 'head')}): "
          f"{'flash ' + v['flash_kernel'] if v.get('flash_ok') else 'standard'}  {v.get('reason') or ''}")
for name, r in s["variants"].items():
    print(f"variant {name}: {r['status']}, kernel {r.get('backend')}, on node(s) "
          f"{[w.get('node_id', '')[:8] for w in r.get('workers') or []]}, {r.get('tokens_per_s') or 0:,.0f} tok/s")
PY
exit $code
