"""run.dir and data in Cloud Storage, against a local emulator: a run in gs:// killed mid-way
and rerun resumes from its checkpoint in the bucket and ends in the state of an uninterrupted
local run; its metrics, config, goodput and summary are objects in the bucket, complete."""

import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import gcsfs
import portpicker
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils.epath import gpath
from training import cli, overrides, write_config

from maxlm import config
from maxlm.data import sources

STEPS = 8


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """An in-memory Cloud Storage emulator with bucket `bkt`: (filesystem, env of a run)."""
    port = portpicker.pick_unused_port()
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "gcs_emulator.py"), "start", f"--port={port}",
         "--default-bucket=bkt", "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the storage emulator did not start"
            time.sleep(0.2)
    url = f"http://localhost:{port}"
    env = {
        "EPATH_USE_TF": "false",  # tf.io.gfile (TensorFlow is in the seqio extra) ignores it
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "HOME": str(tmp_path_factory.mktemp("home")),  # the local staging of remote run dirs
    }
    with pytest.MonkeyPatch.context() as patch:  # gcsfs reads it (an endpoint_url argument
        patch.setenv("STORAGE_EMULATOR_HOST", url)  # would send it to gRPC, which hangs)
        patch.setenv("EPATH_USE_TF", "false")  # and this process's epath must use gcsfs too
        gpath._is_tf_installed.cache_clear()  # epath decides once per process
        yield gcsfs.GCSFileSystem(), env
    gpath._is_tf_installed.cache_clear()
    server.terminate()
    server.wait()


def run(corpus, run_dir, tmp_path, env, **faults):
    cfg = config.load(
        None,
        overrides(
            corpus, run_dir, f"train.steps={STEPS}", "checkpoint.every_steps=3",
            "eval.every_steps=0", "metrics.log_every_steps=1",
            # a save commits before the next step: the kill below finds step 3 in the bucket
            "checkpoint.async_save=false",
        ),
    )  # fmt: skip
    config_file = write_config(tmp_path / "run.yaml", cfg)
    env = {**env, **{f"MAXLM_FAULT_{k.upper()}": str(v) for k, v in faults.items()}}
    return cli([f"--config={config_file}"], cwd=tmp_path, devices=2, env=env)


def steps_of(text):
    return [json.loads(line)["step"] for line in text.splitlines() if "loss" in line]


@pytest.mark.slow
def test_run_dir_in_gcs_killed_and_rerun_ends_in_the_local_runs_state(corpus, bucket, tmp_path):
    fs, env = bucket
    for text in sorted(glob.glob(corpus["glob"])):
        fs.put_file(text, f"bkt/data/{os.path.basename(text)}")
    data = {**corpus, "glob": "gs://bkt/data/*.txt"}

    local = run(data, tmp_path / "local", tmp_path, env)
    assert local.returncode == 0, local.stderr[-3000:]
    local_summary = json.loads((tmp_path / "local" / "summary.json").read_text())

    killed = run(data, "gs://bkt/run", tmp_path, env, kill_at_step=5)
    assert killed.returncode == -9, killed.stderr[-3000:]
    fs.invalidate_cache()  # another process wrote the bucket
    assert not fs.exists("bkt/run/summary.json")
    assert fs.exists("bkt/run/checkpoints/3")
    # uploaded at the checkpoint: the records up to it, though nothing can be appended in GCS
    assert steps_of(fs.cat("bkt/run/metrics.jsonl").decode()) == [1, 2, 3]

    resumed = run(data, "gs://bkt/run", tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fs.invalidate_cache()
    assert "resumed from the checkpoint of step 3 in gs://bkt/run/checkpoints" in resumed.stdout
    summary = json.loads(fs.cat("bkt/run/summary.json"))
    assert summary["state_hash"] == local_summary["state_hash"]
    assert steps_of(fs.cat("bkt/run/metrics.jsonl").decode()) == list(range(1, STEPS + 1))
    sessions = [json.loads(line) for line in fs.cat("bkt/run/goodput.jsonl").splitlines()]
    assert [s["finished"] for s in sessions] == [False, True]
    assert config.loads(fs.cat("bkt/run/config.yaml").decode()).run.dir == "gs://bkt/run"
    assert fs.exists("bkt/run/tokenizer.json") or fs.exists("bkt/run/tokenizer.model")
    assert fs.ls("bkt/run/tensorboard")
    assert {p.rsplit("/", 1)[1] for p in fs.ls("bkt/run/checkpoints")} >= {"6", "8"}

    # open_model reads the model from the bucket: the same text as from the local run
    def generate(checkpoint):
        done = subprocess.run(
            [sys.executable, "-m", "maxlm.generate", f"--checkpoint={checkpoint}",
             "--prompt=def alpha_reads(x):", "--max-new-tokens=12"],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert generate("gs://bkt/run") == generate(tmp_path / "local")


def test_array_record_shards_in_a_bucket_are_refused_by_name(bucket):
    """ArrayRecord's C++ file layer cannot read gs:// (it hangs): a clear error instead."""
    fs, _ = bucket
    fs.pipe("bkt/shards/part-0.array_record", b"not read")
    source = config.SourceConfig(kind="array_record", paths=["gs://bkt/shards/*.array_record"])
    with pytest.raises(config.ConfigError, match=r"data\.sources\.web\.paths: .*local disk"):
        sources.documents(source, "data.sources.web")


@pytest.mark.parametrize("epath_uses_tf", [False, True])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_jsonl_and_parquet_sources_read_the_same_documents_from_a_bucket(
    kind, epath_uses_tf, bucket, tmp_path, monkeypatch
):
    """Records (with unicode, and ** recursing into a sub-folder) read from gs:// equal the
    same files read from a local disk, document for document; data goes through gcsfs even
    where epath would use TensorFlow's gfile (which ignores the emulator, and whose files
    pyarrow cannot read)."""
    fs, _ = bucket
    texts = [[f"doc {i} of part {part}: naïve café ✓" for i in range(5)] for part in range(2)]
    local = tmp_path / kind
    (local / "sub").mkdir(parents=True)
    for part, rows in enumerate(texts):
        path = local / ("sub" if part else "") / f"part-{part}.{kind}"
        if kind == "jsonl":
            path.write_text("".join(json.dumps({"text": t, "n": 1}) + "\n" for t in rows))
        else:
            pq.write_table(pa.table({"text": rows}), path)
        fs.put_file(str(path), f"bkt/{kind}/{path.relative_to(local).as_posix()}")

    def read(pattern):
        docs = sources.documents(config.SourceConfig(kind=kind, paths=[pattern]), "data.sources.x")
        return [docs[i] for i in range(len(docs))]

    monkeypatch.setenv("EPATH_USE_TF", str(epath_uses_tf).lower())
    gpath._is_tf_installed.cache_clear()
    try:
        remote = read(f"gs://bkt/{kind}/**/*.{kind}")
    finally:
        monkeypatch.undo()
        gpath._is_tf_installed.cache_clear()
    assert remote == read(f"{local}/**/*.{kind}")
    assert sorted(remote) == sorted(t for rows in texts for t in rows)
