#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head raylet and a second raylet, both on loopback, with Ray's token
# authentication on. Good for trying multi-node placement (STRICT_SPREAD, one worker per node) and
# `orchestrator submit` without a cloud account.
#
#   cluster/local_cluster.sh start [CPUS_PER_NODE]   # prints the addresses and the token file
#   cluster/local_cluster.sh stop
#
# Environment: RAY_CLUSTER_DIR (state folder, default ./.ray-local), RAY_GCS_PORT (6390),
# RAY_DASHBOARD_PORT (8299), RAY_TMP_DIR (Ray's session files, default /tmp/ray-local-GCS_PORT; the second
# node's are in RAY_TMP_DIR-2). The dashboard and job API listen on 127.0.0.1 only.
set -euo pipefail

DIR=${RAY_CLUSTER_DIR:-$PWD/.ray-local}
GCS_PORT=${RAY_GCS_PORT:-6390}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8299}
# Ray's session folder holds Unix sockets, whose paths must stay under ~107 bytes: keep it short.
TMP_DIR=${RAY_TMP_DIR:-/tmp/ray-local-$GCS_PORT}
RAY=${RAY:-ray}
PYTHON=${PYTHON:-$(dirname "$(command -v "$RAY")")/python}  # the Python that Ray is installed in

start() {
  local cpus=${1:-1}
  mkdir -p "$DIR"
  if [[ -f "$DIR/head.pid" ]] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
    echo "a cluster from $DIR is already running; run: $0 stop" >&2; exit 1
  fi
  # One token for every node and client; kept in a file (mode 600), never on a command line.
  [[ -s "$DIR/auth_token" ]] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/auth_token")
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
  local common=(--node-ip-address 127.0.0.1 --num-cpus "$cpus" --disable-usage-stats --block)
  # Every agent port free and distinct, so this cluster can run beside another Ray on the machine (whose
  # defaults, e.g. the dashboard agent's 52365, it would otherwise collide with and never get a job agent).
  # --block keeps each raylet's supervisor in the foreground of its own process: stop kills exactly these.
  "$RAY" start --head --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
    --temp-dir "$TMP_DIR" --resources '{"node_head": 1}' --ray-client-server-port "$(free_port)" \
    $(agent_ports) "${common[@]}" > "$DIR/head.log" 2>&1 &
  echo $! > "$DIR/head.pid"
  wait_for "head" "$RAY status --address 127.0.0.1:$GCS_PORT"
  # The second node gets its own temp dir, as a second machine would have its own disk. Sharing the head's, its
  # runtime-env agent unpacks a submitted job's working_dir into the same folder the head's agent did, and Ray
  # unpacks with overwrite=True (ray/_private/runtime_env/working_dir.py): the folder is deleted and rewritten
  # under the running job, which then finds its model folder without config.json.
  "$RAY" start --address "127.0.0.1:$GCS_PORT" --resources '{"node_worker": 1}' --temp-dir "$TMP_DIR-2" \
    $(agent_ports) "${common[@]}" \
    > "$DIR/worker.log" 2>&1 &
  echo $! > "$DIR/worker.pid"
  wait_for "second node" "nodes_alive 2"
  cat <<INFO
two-node Ray cluster up ($cpus CPU per node)
  RAY_ADDRESS=127.0.0.1:$GCS_PORT            (drivers on this machine)
  job API:   http://127.0.0.1:$DASHBOARD_PORT  (orchestrator submit --address ...)
  token:     export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/auth_token
INFO
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

agent_ports() {
  echo "--dashboard-agent-listen-port $(free_port) --dashboard-agent-grpc-port $(free_port)" \
       "--metrics-export-port $(free_port) --runtime-env-agent-port $(free_port)"
}

nodes_alive() {
  "$PYTHON" - "$1" <<PY
import sys, ray
ray.init(address="127.0.0.1:$GCS_PORT", logging_level="ERROR", log_to_driver=False)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[1]) else 1)
PY
}

wait_for() {
  local what=$1 probe=$2
  for _ in $(seq 1 120); do
    if eval "$probe" > /dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "the $what did not come up in 120 s; see $DIR/*.log" >&2; stop; exit 1
}

stop() {
  # The second node first: it drains in seconds while the head (GCS) is up; the head alone then stops in ~4 s.
  for role in worker head; do
    local pid_file="$DIR/$role.pid"
    [[ -f "$pid_file" ]] || continue
    local pid; pid=$(cat "$pid_file")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done  # then KILL: no drain needed
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pid_file"
  done
  echo "stopped the cluster in $DIR"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  *) echo "usage: $0 start [CPUS_PER_NODE] | stop" >&2; exit 2 ;;
esac
