#!/usr/bin/env bash
# Usage: bash tpu/remote.sh COMMAND [ARGS]   (on a TPU VM worker, in the code directory)
#
# The worker-side half of the tpu/ scripts: setup.sh, launch.sh and stop.sh run it over
# `gcloud compute tpus tpu-vm ssh --worker=all`. Commands:
#
#   setup [--python VERSION]   a uv venv .venv with Python VERSION (default 3.12; the TPU
#                              images ship 3.10, maxlm needs 3.11+) and pip install -e ".[tpu]"
#   launch [--log FILE] [KEY=VALUE ...] -- CMD ...
#                              start CMD detached (setsid nohup, stdin from /dev/null) with the
#                              KEY=VALUE environment, output appended to FILE (default
#                              train.log), its pid in train.pid; refuses while that one runs
#   stop                       send SIGTERM to the process in train.pid (maxlm finishes the
#                              step, saves a checkpoint and exits 0)
#   wait [--timeout SECONDS]   wait until it has exited (default 600; exit 1 if it has not)
#   -h, --help                 this help

set -euo pipefail

usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }
usage_error() {
  printf 'remote.sh: %s\nRun %s --help for usage.\n' "$*" "$0" >&2
  exit 2
}
host() { hostname 2>/dev/null || echo worker; }
running() {  # whether the process in train.pid runs (an exited one not yet reaped does not)
  local pid
  [[ -f train.pid ]] || return 1
  pid=$(<train.pid)
  kill -0 "$pid" 2>/dev/null || return 1
  ! grep -qs '^State:[[:space:]]*Z' "/proc/$pid/status"
}

setup() {
  local python=3.12
  while (($#)); do
    case $1 in
      --python) (($# > 1)) || usage_error "--python needs a value"; python=$2; shift 2 ;;
      *) usage_error "setup: unknown argument $1" ;;
    esac
  done
  # PIP_BREAK_SYSTEM_PACKAGES: a --user install on images whose Python is "externally managed";
  # older pips ignore it.
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv
  python3 -m uv venv --allow-existing --python "$python" .venv
  python3 -m uv pip install --python .venv/bin/python --quiet -e ".[tpu]"
  echo "$(host): maxlm installed in $PWD/.venv ($(.venv/bin/python --version))"
}

launch() {
  local log=train.log envs=()
  while (($#)); do
    case $1 in
      --log) (($# > 1)) || usage_error "--log needs a value"; log=$2; shift 2 ;;
      --) shift; break ;;
      [A-Za-z_]*=*) envs+=("$1"); shift ;;
      *) usage_error "launch: unknown argument $1" ;;
    esac
  done
  (($#)) || usage_error "launch: no command after --"
  if running; then
    echo "$(host): already running (pid $(cat train.pid)); stop it first (tpu/stop.sh)" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$log")"
  echo "=== $(date -u +%FT%TZ) $(host): $*" >>"$log"
  # A background job of this non-interactive shell is no process-group leader, so setsid
  # does not fork and $! is CMD's own pid; the new session outlives the ssh connection.
  env "${envs[@]}" setsid nohup "$@" >>"$log" 2>&1 </dev/null &
  echo "$!" >train.pid
  echo "$(host): started pid $!, log $PWD/$log"
}

stop() {
  (($# == 0)) || usage_error "stop: unknown argument $1"
  if running; then
    kill -TERM "$(cat train.pid)"
    echo "$(host): sent SIGTERM to pid $(cat train.pid)"
  else
    echo "$(host): no training process running"
  fi
}

wait_exit() {
  local timeout=600 waited=0
  while (($#)); do
    case $1 in
      --timeout) [[ ${2-} =~ ^[0-9]+$ ]] || usage_error "--timeout wants seconds"
        timeout=$2; shift 2 ;;
      *) usage_error "wait: unknown argument $1" ;;
    esac
  done
  while running && ((waited < timeout)); do
    sleep 1
    waited=$((waited + 1))
  done
  if running; then
    echo "$(host): pid $(cat train.pid) still running after ${timeout}s" >&2
    exit 1
  fi
  echo "$(host): no training process running"
}

(($#)) || usage_error "missing command"
command=$1
shift
case $command in
  -h | --help) usage ;;
  setup) setup "$@" ;;
  launch) launch "$@" ;;
  stop) stop "$@" ;;
  wait) wait_exit "$@" ;;
  *) usage_error "unknown command or flag $command" ;;
esac
