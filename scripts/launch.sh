#!/usr/bin/env bash
# Start, stop and check the mlx-cluster processes of this host.
#
# Run a worker on every host and the coordinator on one of them; `--foreground` is for
# service managers (see scripts/systemd/ and scripts/launchd/). Without it the process
# runs in the background with a PID file and a log file in the run directory, and the
# command returns once the process is ready (the worker's ready line, the coordinator's
# "serving ... on http://..." log line, logged at WARNING), or fails with the log's tail
# if the process exits first.
#
# Environment:
#   MLX_CLUSTER_RUN_DIR        PID and log files (default ~/.mlx-cluster/run)
#   MLX_CLUSTER_WORKER_LISTEN  the worker's gRPC HOST:PORT (default 0.0.0.0:50051)
#   MLX_CLUSTER_WORKER_NAME    the worker's name in /health and logs (default: host name)
#   MLX_CLUSTER_URL            the coordinator's HTTP API, for status and test
#                              (default http://127.0.0.1:8100)
#   MLX_CLUSTER_PYTHON         Python with mlx-cluster installed
#                              (default: the repo's .venv if present, else python3)
# Works with the bash 3.2 of macOS.
set -euo pipefail

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=${MLX_CLUSTER_RUN_DIR:-$HOME/.mlx-cluster/run}
worker_listen=${MLX_CLUSTER_WORKER_LISTEN:-0.0.0.0:50051}
worker_name=${MLX_CLUSTER_WORKER_NAME:-$(uname -n)}
url=${MLX_CLUSTER_URL:-http://127.0.0.1:8100}
if [[ -n ${MLX_CLUSTER_PYTHON:-} ]]; then
  python=$MLX_CLUSTER_PYTHON
elif [[ -x $repo_dir/.venv/bin/python ]]; then
  python=$repo_dir/.venv/bin/python
else
  python=python3
fi
# The coordinator reads every MLX_CLUSTER_* variable as a setting and rejects unknown
# names, so the launcher's own variables must not reach the processes it starts.
unset MLX_CLUSTER_RUN_DIR MLX_CLUSTER_WORKER_LISTEN MLX_CLUSTER_WORKER_NAME \
  MLX_CLUSTER_URL MLX_CLUSTER_PYTHON

STOP_TIMEOUT_S=30        # SIGTERM, then SIGKILL after this many seconds
WORKER_READY_S=120       # a worker imports MLX and binds its port
COORDINATOR_READY_S=600  # the coordinator waits for workers and loads every slice
TEST_MAX_TOKENS=32

usage() {
  cat <<EOF
Usage: $(basename "$0") COMMAND [ARGS]

Commands:
  worker [--foreground] [-- WORKER_ARGS...]
      start a worker on this host, listening on \$MLX_CLUSTER_WORKER_LISTEN
  coordinator [--foreground] [--config FILE] [-- COORDINATOR_ARGS...]
      start the coordinator (default config: config/cluster.yaml)
  stop [worker|coordinator|all]   SIGTERM, SIGKILL after ${STOP_TIMEOUT_S} s (default: all)
  status                          local processes, then GET \$MLX_CLUSTER_URL/health
  logs [worker|coordinator] [-f]  show (or follow) the log files
  test [PROMPT]                   one chat completion, with the answer and its timing

Run directory: $run_dir
EOF
}

die() {
  echo "launch.sh: $*" >&2
  exit 1
}

# --- processes --------------------------------------------------------------------------

pid_file() { echo "$run_dir/$1.pid"; }
log_file() { echo "$run_dir/$1.log"; }

# True if PID is a running mlx-cluster process: not a zombie, nor a later process that
# reused the PID.
is_cluster_process() {
  ps -p "$1" -o command= 2>/dev/null | grep mlx_cluster >/dev/null
}

# The PID from ROLE's PID file if that process still runs; nothing otherwise.
live_pid() {
  local file pid
  file=$(pid_file "$1")
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if [[ $pid =~ ^[0-9]+$ ]] && is_cluster_process "$pid"; then
    echo "$pid"
  fi
}

# Wait until ROLE's log shows PATTERN after byte OFFSET, at most LIMIT seconds.
wait_ready() {
  local role=$1 pid=$2 offset=$3 pattern=$4 limit=$5 log ticks=0
  log=$(log_file "$role")
  while ((ticks < limit * 5)); do
    if tail -c "+$((offset + 1))" "$log" | grep -E "$pattern" >/dev/null; then
      echo "$role ready (pid $pid, log $log)"
      return 0
    fi
    if ! is_cluster_process "$pid"; then
      rm -f "$(pid_file "$role")"
      tail -c "+$((offset + 1))" "$log" | tail -n 20 >&2
      die "$role exited before it was ready; log: $log"
    fi
    sleep 0.2
    ticks=$((ticks + 1))
  done
  die "$role (pid $pid) not ready after $limit s; still running, log: $log"
}

# start ROLE FOREGROUND PATTERN LIMIT ARGS...: run `mlx-cluster ROLE ARGS...`.
start() {
  local role=$1 foreground=$2 pattern=$3 limit=$4 pid log offset=0
  shift 4
  if [[ $foreground == 1 ]]; then
    exec "$python" -m mlx_cluster "$role" "$@"
  fi
  mkdir -p "$run_dir"
  pid=$(live_pid "$role")
  [[ -z $pid ]] || die "$role already running (pid $pid); run '$(basename "$0") stop $role' first"
  log=$(log_file "$role")
  if [[ -f $log ]]; then
    offset=$(wc -c <"$log" | tr -d ' ')
  fi
  nohup "$python" -m mlx_cluster "$role" "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$(pid_file "$role")"
  echo "$role starting (pid $pid), waiting for it to be ready"
  wait_ready "$role" "$pid" "$offset" "$pattern" "$limit"
}

stop_role() {
  local role=$1 pid ticks=0
  pid=$(live_pid "$role")
  if [[ -z $pid ]]; then
    rm -f "$(pid_file "$role")"
    echo "$role: not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  while ((ticks < STOP_TIMEOUT_S * 5)) && is_cluster_process "$pid"; do
    sleep 0.2
    ticks=$((ticks + 1))
  done
  if is_cluster_process "$pid"; then
    echo "$role (pid $pid) still running after $STOP_TIMEOUT_S s: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pid_file "$role")"
  echo "$role stopped (pid $pid)"
}

# --- HTTP (Python's urllib: no curl needed, and never through a proxy) -------------------

http_get() {
  "$python" - "$1" <<'PY'
import sys
import urllib.error
import urllib.request

url = sys.argv[1]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=10) as response:
        print(response.read().decode())
except urllib.error.HTTPError as exc:  # /health answers 503 with a body when degraded
    print(exc.read().decode())
    sys.exit(1)
except OSError as exc:
    sys.exit(f"cannot reach {url}: {exc}")
PY
}

chat_test() {
  "$python" - "$url" "$1" "$TEST_MAX_TOKENS" <<'PY'
import json
import sys
import time
import urllib.error
import urllib.request

url, prompt, max_tokens = sys.argv[1] + "/v1/chat/completions", sys.argv[2], int(sys.argv[3])
body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
request = urllib.request.Request(
    url, json.dumps(body).encode(), {"Content-Type": "application/json"}
)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
print(f"POST {url}: {prompt!r}")
started = time.perf_counter()
try:
    with opener.open(request, timeout=300) as response:
        answer = json.load(response)
except urllib.error.HTTPError as exc:
    sys.exit(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}")
except OSError as exc:
    sys.exit(f"cannot reach {url}: {exc}")
elapsed = time.perf_counter() - started
print(answer["choices"][0]["message"]["content"])
usage, perf = answer["usage"], answer.get("performance", {})
print(
    f"--- {usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated tokens "
    f"in {elapsed:.2f} s; first token {perf.get('ttft_ms')} ms, "
    f"{perf.get('tokens_per_second')} tok/s"
)
if usage["completion_tokens"] < 1:
    sys.exit("no tokens generated")
PY
}

# --- commands ---------------------------------------------------------------------------

cmd_worker() {
  local foreground=0
  while (($#)); do
    case $1 in
      --foreground) foreground=1 ;;
      --) shift; break ;;
      *) die "worker: unknown argument '$1' (worker flags go after --)" ;;
    esac
    shift
  done
  start worker "$foreground" '"event": "ready"' "$WORKER_READY_S" \
    --listen "$worker_listen" --name "$worker_name" "$@"
}

cmd_coordinator() {
  local foreground=0 config=$repo_dir/config/cluster.yaml
  while (($#)); do
    case $1 in
      --foreground) foreground=1 ;;
      --config) [[ $# -ge 2 ]] || die "--config needs a FILE"; config=$2; shift ;;
      --) shift; break ;;
      *) die "coordinator: unknown argument '$1' (coordinator flags go after --)" ;;
    esac
    shift
  done
  [[ -f $config ]] || die "no config file $config"
  [[ $config == /* ]] || config=$PWD/$config  # the process may outlive this directory
  start coordinator "$foreground" 'serving .* on http' "$COORDINATOR_READY_S" \
    --config "$config" "$@"
}

cmd_stop() {
  case ${1:-all} in
    worker | coordinator) stop_role "$1" ;;
    all) stop_role coordinator && stop_role worker ;;  # the coordinator first: it ends sessions
    *) die "stop: expected worker, coordinator or all, got '$1'" ;;
  esac
}

cmd_status() {
  local role pid body rc=0
  for role in worker coordinator; do
    pid=$(live_pid "$role")
    if [[ -n $pid ]]; then
      echo "$role: running (pid $pid)"
    elif [[ -f $(pid_file "$role") ]]; then
      echo "$role: not running (stale PID file $(pid_file "$role"))"
    else
      echo "$role: not started here"
    fi
  done
  echo "GET $url/health"
  body=$(http_get "$url/health") || rc=$?
  if [[ -n $body ]]; then
    printf '%s\n' "$body" | "$python" -m json.tool || printf '%s\n' "$body"
  fi
  ((rc == 0)) || echo "launch.sh: the cluster is not healthy" >&2
  return "$rc"
}

cmd_logs() {
  local roles="worker coordinator" follow=0 role files=()
  while (($#)); do
    case $1 in
      worker | coordinator) roles=$1 ;;
      -f | --follow) follow=1 ;;
      *) die "logs: expected worker, coordinator or -f, got '$1'" ;;
    esac
    shift
  done
  for role in $roles; do
    if [[ -f $(log_file "$role") ]]; then files+=("$(log_file "$role")"); fi
  done
  ((${#files[@]})) || die "no log files for '$roles' in $run_dir"
  if ((follow)); then
    exec tail -n 50 -f "${files[@]}"
  fi
  tail -n 50 "${files[@]}"
}

main() {
  local command=${1:-}
  (($#)) && shift
  case $command in
    worker) cmd_worker "$@" ;;
    coordinator) cmd_coordinator "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status ;;
    logs) cmd_logs "$@" ;;
    test) chat_test "${1:-What is the capital of France?}" ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; die "unknown command '$command'" ;;
  esac
}

main "$@"
