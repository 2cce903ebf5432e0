#!/usr/bin/env bash
# Run one Ray node of a cluster of your own machines, and stop exactly what this script started.
#
#   cluster/ray-node.sh head [ray start options...]          start the head node
#   cluster/ray-node.sh join HEAD_IP:PORT [ray start options...]  join this machine as a worker node
#   cluster/ray-node.sh status                               is this script's node running? its address
#   cluster/ray-node.sh stop                                 stop the node this script started
#
# Each node gets labels computed on it (cluster/node_labels.py: accelerator, GLIBC, flash-attn),
# plus FO_EXTRA_LABELS ("k=v,...") if set. Starting is idempotent: a node this script started and
# that still runs is reported, not started twice. The node runs as `ray start --block` in its own
# session; its pid is the process group of every Ray process of the node (GCS, raylet, dashboard,
# workers, job drivers), recorded in the state dir. `stop` signals that process group only: never
# `ray stop`, which would stop every Ray of this user on the machine.
#
# Environment:
#   FO_STATE_DIR        one node per state dir (default: ${XDG_STATE_HOME:-~/.local/state}/flash-orchestrator/ray-node)
#   FO_PYTHON           the interpreter for node_labels.py (default: python3)
#   FO_EXTRA_LABELS     more labels, "k=v,..."
#   FO_START_TIMEOUT    seconds to wait for the node to come up (default 120)
#   FO_STOP_TIMEOUT     seconds between SIGTERM and SIGKILL on stop (default 30)
#   RAY_AUTH_MODE       token (default here) or disabled; the token is read from RAY_AUTH_TOKEN,
#                       RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (the head generates one if none)
# Defaults added unless given: head --port 6379 --dashboard-host 127.0.0.1 --dashboard-port 8265.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${FO_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/flash-orchestrator/ray-node}"
python="${FO_PYTHON:-python3}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}" RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# On SIGTERM Ray drains the node first (30 s by default) for Ray Serve; a training node has
# nothing to drain, and `stop` should not hang.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"

die() { echo "ray-node: $*" >&2; exit "${2:-1}"; }
usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# The recorded pid, if that process still runs and is the `ray start` we launched (pids get reused).
running_pid() {
    [[ -f "$state/pid" ]] || return 1
    local pid; pid="$(cat "$state/pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "ray.* start" || return 1
    fi
    echo "$pid"
}

has_opt() {  # has_opt --name args...: was --name (or --name=...) given?
    local name="$1"; shift
    local a; for a in "$@"; do [[ "$a" == "$name" || "$a" == "$name="* ]] && return 0; done
    return 1
}

ensure_token() {  # token auth needs a token on every node; the head may make one
    [[ "${RAY_AUTH_MODE,,}" == "token" ]] || return 0
    [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH: no token in that file"
        return 0
    fi
    [[ -s "$HOME/.ray/auth_token" ]] && return 0
    [[ "$1" == head ]] || die "token authentication is on, but this machine has no token: copy ~/.ray/auth_token from the head (or set RAY_AUTH_TOKEN), or set RAY_AUTH_MODE=disabled on every node" 2
    ray get-auth-token --generate >/dev/null
    echo "ray-node: generated an auth token in ~/.ray/auth_token; copy it to every worker machine"
}

start() {  # start KIND ray-start-args...
    local kind="$1"; shift
    if pid="$(running_pid)"; then
        [[ "$(cat "$state/kind" 2>/dev/null)" == "$kind" ]] \
            || die "a $(cat "$state/kind" 2>/dev/null) node from $state is running (pid $pid); stop it first"
        echo "ray-node: $kind already running (pid $pid, address $(cat "$state/address" 2>/dev/null))"
        return 0
    fi
    ensure_token "$kind"
    mkdir -p "$state"
    rm -f "$state/pid" "$state/address" "$state/kind"
    local labels; labels="$("$python" "$here/node_labels.py")" || die "cluster/node_labels.py failed"
    [[ -n "${FO_EXTRA_LABELS:-}" ]] && labels="$labels,$FO_EXTRA_LABELS"
    local args=("$@" --labels="$labels" --block)
    if [[ "$kind" == head ]]; then
        has_opt --port "$@" || args+=(--port=6379)
        has_opt --dashboard-host "$@" || args+=(--dashboard-host=127.0.0.1)
        has_opt --dashboard-port "$@" || args+=(--dashboard-port=8265)
    fi
    # A session of its own: the pid is the process group of all the node's processes, and
    # the node outlives this shell and ignores its Ctrl-C.
    local launcher=(); command -v setsid >/dev/null && launcher=(setsid)
    "${launcher[@]}" ray start "${args[@]}" </dev/null >"$state/log" 2>&1 &
    local pid=$!
    echo "$pid" >"$state/pid"; echo "$kind" >"$state/kind"
    local deadline=$((SECONDS + ${FO_START_TIMEOUT:-120}))
    until grep -q "Ray runtime started" "$state/log"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            tail -n 25 "$state/log" >&2
            stop_node quiet
            die "ray start failed; full log: $state/log"
        fi
        sleep 0.5
    done
    # The head prints the address workers join with: ray start --address='IP:PORT'
    local address="$join_address"
    if [[ "$kind" == head ]]; then
        address="$(grep -o -- "--address='[^']*'" "$state/log" | head -n1 | sed "s/--address='\(.*\)'/\1/" || true)"
    fi
    echo "${address:-unknown}" >"$state/address"
    echo "ray-node: $kind started (pid $pid), labels $labels"
    if [[ "$kind" == head ]]; then
        local dash; dash="$(grep -o "http://[0-9a-zA-Z.:-]*:[0-9]*" "$state/log" | tail -n1 || true)"
        echo "ray-node: workers join with: cluster/ray-node.sh join $address"
        echo "ray-node: submit jobs with:  RAY_AUTH_MODE=$RAY_AUTH_MODE ray job submit --address ${dash:-http://127.0.0.1:8265} ..."
    fi
}

# The recorded process group, while any process of it lives. Linux never hands out a pid that
# is still some group's id, so a live group with the recorded id is the one we started.
recorded_group() {
    [[ -f "$state/pid" ]] || return 1
    local pid; pid="$(cat "$state/pid")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 -- "-$pid" 2>/dev/null || return 1
    echo "$pid"
}

stop_node() {
    local pid
    if ! pid="$(recorded_group)"; then
        [[ "${1:-}" == quiet ]] || echo "ray-node: no node started from $state is running"
        rm -f "$state/pid" "$state/address" "$state/kind"
        return 0
    fi
    # The `ray start --block` process first: it stops the node's processes in order (raylet
    # and its workers, then GCS). Signalling the whole group at once would leave it waiting
    # on a raylet that is already gone.
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + ${FO_STOP_TIMEOUT:-30}))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS <= deadline)); do sleep 0.5; done
    kill -TERM -- "-$pid" 2>/dev/null || true  # whatever outlived it
    while kill -0 -- "-$pid" 2>/dev/null && ((SECONDS <= deadline + 5)); do sleep 0.5; done
    if kill -0 -- "-$pid" 2>/dev/null; then
        echo "ray-node: processes of node $pid still running after ${FO_STOP_TIMEOUT:-30}s; killing them"
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$state/pid" "$state/address" "$state/kind"
    [[ "${1:-}" == quiet ]] || echo "ray-node: stopped node $pid"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    head) join_address=""; start head --head "$@" ;;
    join)
        [[ $# -ge 1 && "$1" != -* ]] || die "join needs the head's address: cluster/ray-node.sh join HEAD_IP:6379" 2
        join_address="$1"; shift
        start worker --address="$join_address" "$@" ;;
    stop) stop_node ;;
    status)
        if pid="$(running_pid)"; then
            echo "$(cat "$state/kind") running (pid $pid, address $(cat "$state/address" 2>/dev/null))"
        else
            echo "not running"; exit 3
        fi ;;
    *) usage ;;
esac
