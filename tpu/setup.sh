#!/usr/bin/env bash
# Usage: tpu/setup.sh --name NAME --zone ZONE [flags]
#
# Copies the code to every worker of every slice and installs maxlm with the tpu extra there
# (bash tpu/remote.sh setup: a uv venv ~/REMOTE_DIR/.venv, pip install -e ".[tpu]"). The code is
# this checkout's git tree (git archive; uncommitted edits of tracked files included, untracked
# and ignored files such as .venv, runs/ and data not), sent with gcloud compute tpus tpu-vm scp
# --worker=all; or, with --git, a clone of URL made on each worker.
#
#   --name NAME          the TPU VM / queued resource
#   --zone ZONE
#   --project PROJECT    default: gcloud's configured project
#   --num-slices N       multislice: set up the nodes NAME-0 ... NAME-<N-1> (default 1)
#   --queued             accepted for symmetry with the other scripts
#   --git URL            clone URL on the workers instead of copying this checkout
#   --ref REF            with --git: the branch, tag or commit (default: the remote's HEAD)
#   --copy PATH          also copy PATH (file or directory, e.g. a config not in git) into
#                        REMOTE_DIR on every worker (scp --recurse); repeatable
#   --python VERSION     the workers' Python for maxlm (default 3.12)
#   --remote-dir DIR     where the code goes, relative to the home directory (default maxlm)
#   --dry-run            print the commands without running them
#   -h, --help           this help

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

parse_args "common setup" "$@"
finish_args name zone
tpu_setup
