#!/usr/bin/env bash
# Usage: tpu/relaunch.sh --name NAME --zone ZONE --accelerator-type TYPE --config CONFIG [flags] [OVERRIDE ...]
#
# Keeps a Spot / preemptible run going: every --interval seconds it describes the TPU VM or
# queued resource; when it is PREEMPTED, TERMINATED, SUSPENDED, FAILED or gone, it deletes what
# is left, then runs create, setup and launch again with these flags. maxlm resumes from the
# newest checkpoint in run.dir, so give run.dir=gs://... (a new VM has an empty disk). Takes
# the flags of create.sh, setup.sh and launch.sh, and:
#
#   --once               look once (and relaunch if needed), then exit
#   --interval SECONDS   time between looks (default 300)
#   --max-relaunches N   exit 1 instead of relaunching an N+1th time (default 0: no limit)
#   --dry-run            describe for real, print the other commands without running them
#   -h, --help           this help
#
# Run it where it can keep running (tmux, screen, a small VM); Ctrl-C stops watching only.
# setup copies this checkout as it is at each relaunch (or use --git URL --ref COMMIT).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

parse_args "common create setup launch relaunch" "$@"
finish_args name zone accelerator-type config
tpu_relaunch
