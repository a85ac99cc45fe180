#!/usr/bin/env bash
# Usage: tpu/logs.sh --name NAME --zone ZONE [flags]
#
# Streams the training log of one worker (worker 0 of slice 0 unless told otherwise):
# gcloud compute tpus tpu-vm ssh --worker=0 --command="tail -n 100 -F ~/maxlm/train.log".
# Ctrl-C stops watching; the run goes on.
#
#   --name NAME          the TPU VM / queued resource
#   --zone ZONE
#   --project PROJECT    default: gcloud's configured project
#   --num-slices N       multislice: the run has nodes NAME-0 ... NAME-<N-1> (default 1)
#   --queued             accepted for symmetry with the other scripts
#   --slice I            with --num-slices: the slice to read (default 0)
#   --worker W           the worker to read (default 0)
#   --lines N            start with the last N lines (default 100)
#   --no-follow          print the last lines and return instead of following
#   --log FILE           the log, relative to REMOTE_DIR (default train.log)
#   --remote-dir DIR     where setup.sh put the code (default maxlm)
#   --dry-run            print the gcloud command without running it
#   -h, --help           this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

parse_args "common logs" "$@"
finish_args name zone
tpu_logs
