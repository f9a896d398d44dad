#!/usr/bin/env bash
# A local multi-process Ray cluster: a head node and a worker node started with `ray start`
# as separate processes, each with its own temp dir, CPUs, object store and a custom
# resource (`unclip_head` / `unclip_worker`) that pins work to it. `unclip` commands reach it
# through RAY_ADDRESS and run exactly as on a real cluster.
#
#   cluster/local-cluster.sh start  [options]   start head + worker, wait until both are alive
#   cluster/local-cluster.sh status [options]   list the cluster's nodes (exit 1 if not 2 alive)
#   cluster/local-cluster.sh stop   [options]   stop both nodes (only this cluster's processes)
#   cluster/local-cluster.sh start-worker [options]   (re)start only the worker node
#   cluster/local-cluster.sh kill-worker  [options]   SIGKILL the worker node (fault tests)
#
# options (environment variable in brackets, default after it):
#   --port N            GCS port of the head            [UNCLIP_RAY_PORT, 6380]
#   --head-cpus N       CPUs of the head node           [UNCLIP_HEAD_CPUS, 1]
#   --worker-cpus N     CPUs of the worker node         [UNCLIP_WORKER_CPUS, 1]
#   --object-store-mb N object store per node, in MiB   [UNCLIP_OBJECT_STORE_MB, 256]
#   --dir DIR           temp dirs: DIR/head, DIR/worker [UNCLIP_CLUSTER_DIR, /tmp/unclip-cluster-PORT]
#
# `stop` and `kill-worker` end only processes whose command line names this cluster's own
# temp dirs; they never run `ray stop`, which would end every Ray on the machine.
# Storage: both nodes are on this machine, so a local `storage:` folder works here; on a
# real cluster it must be a shared URI (s3://, gs://, NFS), never the head node's /tmp.
set -euo pipefail

cmd=${1:-start}
[[ $# -gt 0 ]] && shift
PORT=${UNCLIP_RAY_PORT:-6380}
HEAD_CPUS=${UNCLIP_HEAD_CPUS:-1}
WORKER_CPUS=${UNCLIP_WORKER_CPUS:-1}
STORE_MB=${UNCLIP_OBJECT_STORE_MB:-256}
DIR=${UNCLIP_CLUSTER_DIR:-}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --head-cpus) HEAD_CPUS=$2; shift 2 ;;
    --worker-cpus) WORKER_CPUS=$2; shift 2 ;;
    --object-store-mb) STORE_MB=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
DIR=${DIR:-/tmp/unclip-cluster-$PORT}
ADDRESS=127.0.0.1:$PORT
STORE_BYTES=$((STORE_MB * 1024 * 1024))
# Ray 2.60 turns token authentication on for a head when ~/.ray/auth_token exists, but not
# for a worker joining it ("InvalidAuthToken ... RAY_AUTH_MODE is currently 'disabled'"):
# set the mode explicitly for both, and make sure a token exists.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Notice a dead node within a few seconds instead of ~30 s (Ray's GCS health checks).
export RAY_health_check_period_ms=${RAY_health_check_period_ms:-1000}
export RAY_health_check_timeout_ms=${RAY_health_check_timeout_ms:-1000}
export RAY_health_check_failure_threshold=${RAY_health_check_failure_threshold:-3}

ensure_token() {
  if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
    ray get-auth-token --generate >/dev/null
  fi
}

node_pids() { # PIDs of one node: processes naming its own temp dir, and their children
  local pids all=""
  pids=$(pgrep -f -- "$DIR/$1/" || true)
  while [[ -n $pids ]]; do
    all="$all $pids"
    pids=$(for p in $pids; do pgrep -P "$p" || true; done)
  done
  echo $all
}

kill_node() { # kill_node NAME SIGNAL: signal the node's processes, wait until they are gone
  local pids
  pids=$(node_pids "$1")
  [[ -z $pids ]] && return 0
  # shellcheck disable=SC2086
  kill "-$2" $pids 2>/dev/null || true
  for _ in $(seq 1 50); do
    [[ -z $(node_pids "$1") ]] && return 0
    sleep 0.2
  done
  pids=$(node_pids "$1")
  # shellcheck disable=SC2086
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
}

start_head() {
  mkdir -p "$DIR/head"
  ray start --head --node-ip-address=127.0.0.1 --port="$PORT" \
    --num-cpus="$HEAD_CPUS" --resources='{"unclip_head": 1000}' \
    --object-store-memory="$STORE_BYTES" --temp-dir="$DIR/head" \
    --include-dashboard=false --dashboard-port=$((PORT + 1)) \
    --dashboard-agent-listen-port=0 --disable-usage-stats >"$DIR/head.log" 2>&1 ||
    { cat "$DIR/head.log" >&2; return 1; }
}

start_worker() {
  mkdir -p "$DIR/worker"
  ray start --address="$ADDRESS" --node-ip-address=127.0.0.1 \
    --num-cpus="$WORKER_CPUS" --resources='{"unclip_worker": 1000}' \
    --object-store-memory="$STORE_BYTES" --temp-dir="$DIR/worker" \
    --dashboard-agent-listen-port=0 --disable-usage-stats >"$DIR/worker.log" 2>&1 ||
    { cat "$DIR/worker.log" >&2; return 1; }
}

# status [--wait]: print the alive nodes; with --wait, poll until head and worker are both alive.
status() {
  python - "$ADDRESS" "${1:-}" <<'EOF'
import sys, time
import ray

address, wait = sys.argv[1], sys.argv[2] == "--wait"
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + (120 if wait else 0)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    roles = sorted(r for n in alive for r in ("unclip_head", "unclip_worker") if r in n["Resources"])
    if roles == ["unclip_head", "unclip_worker"] or time.monotonic() >= deadline:
        break
    time.sleep(1)
for n in alive:
    role = "head" if "unclip_head" in n["Resources"] else "worker"
    print(f"{role:7s} {n['NodeID']} CPU={n['Resources'].get('CPU', 0):g} {n['NodeManagerAddress']}")
sys.exit(0 if roles == ["unclip_head", "unclip_worker"] else 1)
EOF
}

case "$cmd" in
  start)
    if [[ -n $(node_pids head) ]]; then
      echo "a cluster already runs in $DIR (stop it first)" >&2
      exit 1
    fi
    ensure_token
    start_head
    start_worker
    status --wait
    # Drivers given an explicit address never turn token auth on by themselves (Ray 2.60).
    echo "export RAY_ADDRESS=$ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE"
    ;;
  start-worker)
    ensure_token
    start_worker
    status --wait
    ;;
  kill-worker)
    kill_node worker KILL
    ;;
  status)
    status
    ;;
  stop)
    kill_node worker TERM
    kill_node head TERM
    echo "stopped the cluster in $DIR"
    ;;
  *)
    echo "usage: $0 {start|status|stop|start-worker|kill-worker} [--port N] [--head-cpus N]" \
      "[--worker-cpus N] [--object-store-mb N] [--dir DIR]" >&2
    exit 2
    ;;
esac
