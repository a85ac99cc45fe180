#!/usr/bin/env bash
# Usage: tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE [flags]
#
# Creates a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued or --num-slices N > 1,
# a queued resource (gcloud compute tpus queued-resources create) and waits until it is ACTIVE.
#
#   --name NAME              the TPU VM / queued resource (multislice nodes: NAME-0, NAME-1, ...)
#   --zone ZONE              e.g. us-east5-b (v6e, v5p), us-west4-a (v5e), us-central2-b (v4)
#   --project PROJECT        default: gcloud's configured project
#   --accelerator-type TYPE  v4-8, v5litepod-16, v5p-8, v6e-8, ... (one slice)
#   --runtime-version V      default by generation: v6e v2-alpha-tpuv6e, v5e v2-alpha-tpuv5-lite,
#                            v5p v2-alpha-tpuv5, v4 and older tpu-ubuntu2204-base
#   --spot                   Spot capacity: cheaper, can be preempted (see tpu/relaunch.sh)
#   --preemptible            the older preemptible TPU VM (not for queued resources)
#   --queued                 a queued resource: waits in line until capacity is free
#   --num-slices N           multislice: a queued resource of N slices of TYPE (default 1)
#   --no-wait                return once the queued resource is requested, not when ACTIVE
#   --create-arg ARG         one more gcloud create flag, repeatable (--create-arg=--network=NET)
#   --dry-run                print the gcloud commands without running them
#   -h, --help               this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

parse_args "common create" "$@"
finish_args name zone accelerator-type
tpu_create
