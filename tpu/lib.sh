# shellcheck shell=bash
# Shared code of the tpu/*.sh scripts, sourced by them (never run by itself): flag parsing, the
# printed-then-run gcloud calls, and the steps of a run's life. docs/tpu.md is the guide.
#
# A run is NAME in ZONE: a TPU VM, or a queued resource (--queued) whose node is also NAME, or a
# multislice queued resource (--num-slices N) whose nodes are NAME-0 ... NAME-<N-1>. Every
# script takes the same --name / --zone / --project / --num-slices / --queued, so one set of
# flags names the run everywhere.

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT=$(basename "$0")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The flags (without --) of each group; a script accepts some groups. VALUE_FLAGS take a value,
# the others are switches; "overrides" stands for maxlm.train overrides (arguments, not flags).
flag_group() {
  case $1 in
    common) echo "name zone project num-slices queued dry-run" ;;
    create) echo "accelerator-type runtime-version spot preemptible no-wait create-arg" ;;
    setup) echo "git ref copy python remote-dir" ;;
    launch) echo "config env log remote-dir overrides" ;;
    logs) echo "worker slice lines no-follow log remote-dir" ;;
    stop) echo "timeout remote-dir" ;;
    relaunch) echo "once interval max-relaunches" ;;
  esac
}
VALUE_FLAGS=" name zone project num-slices accelerator-type runtime-version create-arg git ref copy
  python remote-dir config env log worker slice lines timeout interval max-relaunches "
VALUE_FLAGS=${VALUE_FLAGS//$'\n'/ }

# Their values, with the defaults.
NAME="" ZONE="" PROJECT="" NUM_SLICES=1 QUEUED=0 DRY_RUN=0
ACCELERATOR_TYPE="" RUNTIME_VERSION="" SPOT=0 PREEMPTIBLE=0 WAIT=1 CREATE_ARGS=()
GIT_URL="" GIT_REF="" COPY=() PYTHON_VERSION=3.12 REMOTE_DIR=maxlm
CONFIG="" ENVS=() LOG=train.log OVERRIDES=()
WORKER=0 SLICE=0 LINES=100 FOLLOW=1 TIMEOUT=600
ONCE=0 INTERVAL=300 MAX_RELAUNCHES=0
POLL_SECONDS=${TPU_POLL_SECONDS:-30}  # how often to look at a queued resource that is not ACTIVE yet
LOC=() NODES=()

usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }
note() { printf '%s: %s\n' "$SCRIPT" "$*" >&2; }
die() { note "$*"; exit 1; }
usage_error() {
  note "$*"
  printf 'Run %s --help for usage.\n' "$0" >&2
  exit 2
}

# squote ARG...: the arguments as one line a shell reads back as they are: each bare when safe,
# else in single quotes. Builds the commands run on the workers.
squote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# quote ARG...: like squote, but easier to read for printing: --flag=value quotes only the
# value, and a value holding single quotes (a remote command) goes in double quotes when that
# means the same.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^--[a-z-]+=.*[^A-Za-z0-9_@%+=:,./-] ]]; then
      out+=("${arg%%=*}=$(quote "${arg#*=}")")
    elif [[ $arg == *\'* && $arg != *[\"\$\`\\!]* ]]; then
      out+=("\"$arg\"")
    else
      out+=("$(squote "$arg")")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# run CMD...: print "+ CMD" to stderr, then run it unless --dry-run.
run() {
  printf '+ %s\n' "$(quote "$@")" >&2
  if ((!DRY_RUN)); then "$@"; fi
}
gc() { run gcloud compute tpus "$@"; }

# parse_args "GROUP..." ARG...: reads the flags of those groups into the globals above. Arguments
# that are not flags, and all after --, are maxlm.train overrides where "overrides" is accepted.
parse_args() {
  local accepted=" " group arg flag value has_value
  for group in $1; do accepted+="$(flag_group "$group") "; done
  shift
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help) usage; exit 0 ;;
      --) [[ $accepted == *" overrides "* ]] || usage_error "unexpected argument --"
        OVERRIDES+=("$@"); break ;;
      --*) ;;
      *) [[ $accepted == *" overrides "* ]] || usage_error "unexpected argument '$arg'"
        OVERRIDES+=("$arg"); continue ;;
    esac
    flag=${arg%%=*}
    flag=${flag#--}
    has_value=0 value=""
    if [[ $arg == *=* ]]; then value=${arg#*=} has_value=1; fi
    [[ $accepted == *" $flag "* && $flag != overrides ]] || usage_error "unknown flag --$flag"
    if [[ $VALUE_FLAGS == *" $flag "* ]]; then
      if ((!has_value)); then
        # A value may start with -- only for --create-arg (it is a gcloud flag).
        (($# > 0)) && [[ $1 != --* || $flag == create-arg ]] || usage_error "--$flag needs a value"
        value=$1
        shift
      fi
    elif ((has_value)); then
      usage_error "--$flag takes no value"
    fi
    case $flag in
      num-slices | worker | slice | lines | timeout | interval | max-relaunches)
        [[ $value =~ ^[0-9]+$ ]] || usage_error "--$flag wants a whole number, got '$value'"
        value=$((10#$value)) ;;  # 010 is ten, not octal
    esac
    case $flag in
      name) NAME=$value ;;
      zone) ZONE=$value ;;
      project) PROJECT=$value ;;
      num-slices) NUM_SLICES=$value ;;
      queued) QUEUED=1 ;;
      dry-run) DRY_RUN=1 ;;
      accelerator-type) ACCELERATOR_TYPE=$value ;;
      runtime-version) RUNTIME_VERSION=$value ;;
      spot) SPOT=1 ;;
      preemptible) PREEMPTIBLE=1 ;;
      no-wait) WAIT=0 ;;
      create-arg) CREATE_ARGS+=("$value") ;;
      git) GIT_URL=$value ;;
      ref) GIT_REF=$value ;;
      copy) [[ -e $value ]] || usage_error "--copy: no such file or directory: $value"
        COPY+=("$value") ;;
      python) PYTHON_VERSION=$value ;;
      remote-dir) REMOTE_DIR=$value ;;
      config) CONFIG=$value ;;
      env) [[ $value =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants KEY=VALUE, got '$value'"
        ENVS+=("$value") ;;
      log) LOG=$value ;;
      worker) WORKER=$value ;;
      slice) SLICE=$value ;;
      lines) LINES=$value ;;
      no-follow) FOLLOW=0 ;;
      timeout) TIMEOUT=$value ;;
      once) ONCE=1 ;;
      interval) INTERVAL=$value ;;
      max-relaunches) MAX_RELAUNCHES=$value ;;
    esac
  done
}

# finish_args FLAG...: exit 2 unless each named flag was given or a combination is invalid;
# then derive the gcloud location flags and the node names, and check that gcloud is there.
finish_args() {
  local flag var i
  for flag in "$@"; do
    var=${flag//-/_}
    var=${var^^}
    [[ -n ${!var} ]] || usage_error "missing required flag --$flag"
  done
  ((NUM_SLICES >= 1)) || usage_error "--num-slices must be at least 1"
  if ((NUM_SLICES > 1)); then QUEUED=1; fi  # multislice is always a queued resource
  ((SLICE < NUM_SLICES)) || usage_error "--slice $SLICE: the run has $NUM_SLICES slice(s)"
  if ((SPOT && PREEMPTIBLE)); then usage_error "--spot and --preemptible exclude each other"; fi
  if ((PREEMPTIBLE && QUEUED)); then
    usage_error "--preemptible is for a TPU VM; a queued resource takes --spot"
  fi
  if [[ -n $GIT_REF && -z $GIT_URL ]]; then usage_error "--ref needs --git URL"; fi
  if [[ -n $ACCELERATOR_TYPE && -z $RUNTIME_VERSION ]]; then
    case $ACCELERATOR_TYPE in
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v4-* | v3-* | v2-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
      *) usage_error "no default runtime version for --accelerator-type $ACCELERATOR_TYPE;" \
        "give --runtime-version" ;;
    esac
  fi
  LOC=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOC+=(--project="$PROJECT"); fi
  NODES=("$NAME")
  if ((NUM_SLICES > 1)); then
    NODES=()
    for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$NAME-$i"); done
  fi
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
  fi
}

# tpu_state: print the VM's state (READY, PREEMPTED, ...) or the queued resource's (ACTIVE,
# SUSPENDED, ...), NOT_FOUND when it does not exist, UNKNOWN when gcloud fails otherwise. Runs
# even with --dry-run: it only reads.
tpu_state() {
  local cmd out
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format="value(state.state)")
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format="value(state)")
  fi
  printf '+ %s\n' "$(quote "${cmd[@]}")" >&2
  if out=$("${cmd[@]}" 2>"$WORK/stderr"); then
    echo "${out:-UNKNOWN}"
  elif grep -qi 'not_found\|not found' "$WORK/stderr"; then
    echo NOT_FOUND
  else
    cat "$WORK/stderr" >&2
    echo UNKNOWN
  fi
}

tpu_create() {
  local cmd
  if ((QUEUED)); then
    cmd=(queued-resources create "$NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE"
      --runtime-version="$RUNTIME_VERSION")
    if ((NUM_SLICES > 1)); then
      cmd+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
    else
      cmd+=(--node-id="$NAME")
    fi
  else
    cmd=(tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE"
      --version="$RUNTIME_VERSION")
  fi
  if ((SPOT)); then cmd+=(--spot); fi
  if ((PREEMPTIBLE)); then cmd+=(--preemptible); fi
  gc "${cmd[@]}" "${CREATE_ARGS[@]}"
  # A TPU VM is READY when create returns; a queued resource waits in line for capacity.
  if ((QUEUED && WAIT && !DRY_RUN)); then wait_active; fi
}

wait_active() {
  local state
  while true; do
    state=$(tpu_state)
    case $state in
      ACTIVE) note "queued resource $NAME is ACTIVE"; return 0 ;;
      FAILED | SUSPENDED | NOT_FOUND) die "queued resource $NAME is $state" ;;
    esac
    note "queued resource $NAME is $state; looking again in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
  done
}

tpu_delete() {
  if ((QUEUED)); then
    gc queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    gc tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

# tpu_setup: the code on every worker of every slice, then tpu/remote.sh setup there (a Python
# $PYTHON_VERSION venv with maxlm[tpu]). The code is the git tree of this checkout, uncommitted
# edits of tracked files included (git stash create + git archive: no venv, data or runs), or
# with --git a clone of URL at --ref.
tpu_setup() {
  local root tree remote node path dir
  dir=$(squote "$REMOTE_DIR")
  if [[ -n $GIT_URL ]]; then
    remote="(test -d $dir/.git || git clone --quiet $(squote "$GIT_URL") $dir)"
    remote+=" && git -C $dir fetch --quiet origin"
    remote+=" && git -C $dir checkout --quiet --detach $(squote "${GIT_REF:-origin/HEAD}")"
  else
    root=$(git -C "$TPU_DIR" rev-parse --show-toplevel)
    tree=$(git -C "$root" stash create)
    run git -C "$root" archive --format=tar.gz -o "$WORK/maxlm.tar.gz" "${tree:-HEAD}"
    remote="mkdir -p $dir && tar -xzf maxlm.tar.gz -C $dir && rm maxlm.tar.gz"
  fi
  remote+=" && cd $dir && bash tpu/remote.sh setup --python $(squote "$PYTHON_VERSION")"
  for node in "${NODES[@]}"; do
    if [[ -z $GIT_URL ]]; then
      gc tpu-vm scp "$WORK/maxlm.tar.gz" "$node:maxlm.tar.gz" "${LOC[@]}" --worker=all
    fi
    gc tpu-vm ssh "$node" "${LOC[@]}" --worker=all --command="$remote"
    for path in "${COPY[@]}"; do
      gc tpu-vm scp "$path" "$node:$REMOTE_DIR/" "${LOC[@]}" --worker=all --recurse
    done
  done
}

# tpu_launch: python -m maxlm.train on every worker of every slice at once, detached (setsid
# nohup, output appended to $REMOTE_DIR/$LOG), with PYTHONUNBUFFERED=1 and the --env variables.
tpu_launch() {
  local remote node
  if ((NUM_SLICES > 1)) && [[ " ${OVERRIDES[*]} " != *" mesh.dcn_"* ]]; then
    note "multislice: unless $CONFIG sets it, add mesh.dcn_data=$NUM_SLICES (or mesh.dcn_fsdp)"
  fi
  remote="cd $(squote "$REMOTE_DIR") && bash tpu/remote.sh launch --log $(squote "$LOG")"
  remote+=" $(squote PYTHONUNBUFFERED=1 "${ENVS[@]}") --"
  remote+=" .venv/bin/python -m maxlm.train $(squote "--config=$CONFIG" "${OVERRIDES[@]}")"
  for node in "${NODES[@]}"; do
    gc tpu-vm ssh "$node" "${LOC[@]}" --worker=all --command="$remote"
  done
}

tpu_logs() {
  local tail=(tail -n "$LINES")
  if ((FOLLOW)); then tail+=(-F); fi
  gc tpu-vm ssh "${NODES[$SLICE]}" "${LOC[@]}" --worker="$WORKER" \
    --command="$(squote "${tail[@]}" "$REMOTE_DIR/$LOG")"
}

# tpu_stop: SIGTERM to the training process on every worker of every slice first (maxlm
# finishes the step, saves a checkpoint, exits 0; all slices must get it before any save can
# finish), then wait up to --timeout seconds for each to exit.
tpu_stop() {
  local node dir
  dir=$(squote "$REMOTE_DIR")
  for node in "${NODES[@]}"; do
    gc tpu-vm ssh "$node" "${LOC[@]}" --worker=all --command="cd $dir && bash tpu/remote.sh stop"
  done
  if ((TIMEOUT > 0)); then
    for node in "${NODES[@]}"; do
      gc tpu-vm ssh "$node" "${LOC[@]}" --worker=all \
        --command="cd $dir && bash tpu/remote.sh wait --timeout $TIMEOUT"
    done
  fi
}

# tpu_relaunch: look at the VM / queued resource every --interval seconds (once with --once);
# when it is preempted, suspended, failed or gone: delete what is left, create, setup, launch.
# maxlm resumes from the newest checkpoint in run.dir by itself.
tpu_relaunch() {
  local state relaunches=0
  while true; do
    state=$(tpu_state)
    case $state in
      READY | ACTIVE) note "$NAME is $state" ;;
      PREEMPTED | TERMINATED | SUSPENDED | FAILED | NOT_FOUND)
        if ((MAX_RELAUNCHES > 0 && relaunches >= MAX_RELAUNCHES)); then
          die "$NAME is $state; giving up after $relaunches relaunch(es) (--max-relaunches)"
        fi
        relaunches=$((relaunches + 1))
        note "$NAME is $state at $(date -u +%FT%TZ): relaunch $relaunches (create, setup, launch)"
        if [[ $state != NOT_FOUND ]]; then tpu_delete; fi
        tpu_create
        tpu_setup
        tpu_launch
        ;;
      *) note "$NAME is $state; waiting" ;;
    esac
    if ((ONCE)); then return 0; fi
    sleep "$INTERVAL"
  done
}
