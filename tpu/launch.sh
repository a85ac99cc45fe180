#!/usr/bin/env bash
# Usage: tpu/launch.sh --name NAME --zone ZONE --config CONFIG [flags] [OVERRIDE ...] [-- OVERRIDE ...]
#
# Starts python -m maxlm.train --config=CONFIG OVERRIDE ... on every worker of every slice at
# once (gcloud compute tpus tpu-vm ssh --worker=all), detached: setsid nohup, output appended to
# ~/REMOTE_DIR/LOG on each worker, pid in ~/REMOTE_DIR/train.pid; ssh returns at once. The
# environment is PYTHONUNBUFFERED=1 plus the --env variables. Refuses on a worker where the
# previous launch still runs. After a preemption, the same command resumes from the newest
# checkpoint in run.dir. OVERRIDEs are maxlm's dotted keys, e.g. run.dir=gs://BUCKET/runs/NAME
# (a multi-host run needs run.dir on GCS) or, for multislice, mesh.dcn_data=N.
#
#   --name NAME          the TPU VM / queued resource
#   --zone ZONE
#   --project PROJECT    default: gcloud's configured project
#   --num-slices N       multislice: launch on the nodes NAME-0 ... NAME-<N-1> (default 1)
#   --queued             accepted for symmetry with the other scripts
#   --config CONFIG      the YAML config, relative to REMOTE_DIR (e.g. configs/demo.yaml)
#   --env KEY=VALUE      an environment variable for the run, repeatable (it is printed)
#   --log FILE           the log, relative to REMOTE_DIR (default train.log)
#   --remote-dir DIR     where setup.sh put the code (default maxlm)
#   --dry-run            print the gcloud commands without running them
#   -h, --help           this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

parse_args "common launch" "$@"
finish_args name zone config
tpu_launch
