"""Test setup: 8 fake CPU devices, set before jax is imported anywhere.

Backend optimization level 0 halves compile times on 2 cores; tests compare numerics within one
setting, and the benchmarks (not the tests) measure speed with XLA's defaults.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The whole test run shares one compilation cache: the same tiny programs, built anew by many
# tests, compile once per session (a train step takes ~6 s on 2 cores even at optimization level
# 0). pytest-xdist's controller makes it; its workers and the subprocesses they start (`python -m
# maxlm.train` and the other tools) inherit it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = (
    os.environ["JAX_COMPILATION_CACHE_DIR"]
    if "PYTEST_XDIST_WORKER" in os.environ
    else tempfile.mkdtemp(prefix="maxlm-tests-jax-cache-")
)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from maxlm import host_memory  # imports no jax

# `python -m maxlm.train` subprocesses then start as they would restart themselves (2 s saved each)
os.environ.update(host_memory.environment())

import jax
import pytest

jax.config.update("jax_threefry_partitionable", True)


def pytest_unconfigure(config):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, or a run without workers
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The learnable code-like corpus of tests/training.py, and a tokenizer cache beside it."""
    from training import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("tokenizers"))
