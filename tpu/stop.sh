#!/usr/bin/env bash
# Usage: tpu/stop.sh --name NAME --zone ZONE [flags]
#
# Stops the training run: SIGTERM to the process launch.sh started on every worker of every
# slice (maxlm finishes the step, saves a checkpoint, exits 0), then waits for them to exit.
# The VM stays; tpu/delete.sh removes it. launch.sh with the same flags resumes the run.
#
#   --name NAME          the TPU VM / queued resource
#   --zone ZONE
#   --project PROJECT    default: gcloud's configured project
#   --num-slices N       multislice: stop on the nodes NAME-0 ... NAME-<N-1> (default 1)
#   --queued             accepted for symmetry with the other scripts
#   --timeout SECONDS    how long to wait for the save and exit (default 600; 0: do not wait)
#   --remote-dir DIR     where setup.sh put the code (default maxlm)
#   --dry-run            print the gcloud commands without running them
#   -h, --help           this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

parse_args "common stop" "$@"
finish_args name zone
tpu_stop
