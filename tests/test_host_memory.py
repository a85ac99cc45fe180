"""Huge-page malloc for XLA:CPU's per-step buffers: the CLI's restart, and the page faults saved."""

import os
import subprocess
import sys

import pytest

from maxlm import host_memory

needs_huge_pages = pytest.mark.skipif(
    not host_memory.wanted({}), reason="no glibc >= 2.35 with transparent huge pages here"
)

# A jitted step whose temporaries (four 64 MiB intermediates) XLA:CPU allocates every call.
FAULTS_PER_CALL = """
import resource, jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.sum(jnp.sin(jnp.cos(x) @ jnp.exp(x)) * jnp.tanh(x)))
x = jnp.ones((4096, 4096))
step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MAXLM_HUGE_PAGES")}
    return {**env, **extra}


def test_tunables_keep_the_users_own():
    assert host_memory.tunables({}) == "glibc.malloc.hugetlb=1"
    assert host_memory.tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert not host_memory.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not host_memory.wanted({"MAXLM_HUGE_PAGES": "0"})
    assert host_memory.environment({"MAXLM_HUGE_PAGES": "0"}) == {"MAXLM_HUGE_PAGES": "0"}


@needs_huge_pages
def test_environment_for_children_adds_the_tunable():
    env = host_memory.environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
    }


@needs_huge_pages
def test_restart_runs_the_same_command_once_with_huge_pages():
    script = (
        "import os, sys; from maxlm import host_memory; "
        "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True); "
        "host_memory.restart_with_huge_pages(); print('done')"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, "a", "b=1"],
        env=clean_env(GLIBC_TUNABLES="glibc.malloc.arena_max=4"),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    first, second, done = run.stdout.splitlines()
    pid = first.split()[0]
    assert first == f"{pid} glibc.malloc.arena_max=4 ['a', 'b=1']"
    assert second == f"{pid} glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 ['a', 'b=1']"
    assert done == "done"
    opted_out = subprocess.run(
        [sys.executable, "-c", script], env=clean_env(MAXLM_HUGE_PAGES="0"),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert opted_out.stdout.splitlines()[1] == "done"


@needs_huge_pages
def test_huge_pages_cut_xla_page_faults():
    """The mechanism, not a timing: each call's temporaries fault in 4 KiB pages without it."""

    def faults(**env: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_CALL], env=clean_env(JAX_PLATFORMS="cpu", **env),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(run.stdout.split()[-1])

    plain, huge = faults(), faults(GLIBC_TUNABLES=host_memory.tunables({}))
    assert plain > 30_000  # >= 120 MiB of 4 KiB pages per call
    assert huge < plain / 10
