#!/usr/bin/env bash
# Usage: tpu/delete.sh --name NAME --zone ZONE [--queued | --num-slices N] [flags]
#
# Deletes the TPU VM (gcloud compute tpus tpu-vm delete --quiet) or, with --queued or
# --num-slices N > 1, the queued resource and its nodes (queued-resources delete --force
# --quiet). Without asking: checkpoints you want to keep belong in GCS (run.dir=gs://...).
#
#   --name NAME          the TPU VM / queued resource
#   --zone ZONE
#   --project PROJECT    default: gcloud's configured project
#   --queued             it is a queued resource
#   --num-slices N       a multislice queued resource (implies --queued)
#   --dry-run            print the gcloud command without running it
#   -h, --help           this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

parse_args "common" "$@"
finish_args name zone
tpu_delete
