#!/usr/bin/env bash
# Start (or stop) a local multi-process Ray cluster: a head and one worker node, separate
# processes with their own resources, so `RAY_ADDRESS=127.0.0.1:6380 unclip run …` spreads
# work over two "nodes" on one machine.
#   cluster/local-cluster.sh start [HEAD_CPUS] [WORKER_CPUS]
#   cluster/local-cluster.sh stop
set -euo pipefail
PORT=${UNCLIP_RAY_PORT:-6380}
case "${1:-start}" in
  start)
    ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="${2:-1}" \
      --include-dashboard=false --disable-usage-stats
    ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="${3:-1}" \
      --disable-usage-stats
    echo "export RAY_ADDRESS=127.0.0.1:$PORT"
    ;;
  stop)
    ray stop --force
    ;;
  *)
    echo "usage: $0 start [HEAD_CPUS] [WORKER_CPUS] | stop" >&2
    exit 2
    ;;
esac
