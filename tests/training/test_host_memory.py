"""Freed host memory is reused on CPUs (megatron/training/host_memory.py).

The allocator setting is process-wide, so every check runs in a fresh process. Page faults
are counted, not timed: a 64 MB tensor freed and allocated again costs about 16,000 minor
faults each time under glibc's defaults (its block goes back to the system and comes back
zeroed) and next to none when the memory is kept.
"""

import os
import subprocess
import sys

import pytest

from megatron.training.host_memory import _glibc
from tests.helpers import REPO, TINY_MODEL

FAULTS = """
import resource, sys, torch
from megatron.training.host_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # 64 MB allocated and freed: the heap settles within three (alignment
    torch.ones(2048, 8192)  # padding may keep one from fitting the block freed before it)
before = faults()
for _ in range(3):
    torch.ones(2048, 8192)
print(faults() - before)
"""

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc")


def _settled_allocation_faults(mode: str) -> int:
    """Minor page faults of three 64 MB allocations after three to settle the heap."""
    result = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                            text=True, timeout=120, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@needs_glibc
def test_freed_memory_is_reused():
    pages = 64 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")
    assert _settled_allocation_faults("glibc") > 2 * pages  # the check can fail
    assert _settled_allocation_faults("reuse") < pages // 20


@needs_glibc
@pytest.mark.parametrize("flag", [[], ["--no-host-memory-reuse"]])
def test_pretrain_sets_it_on_cpu(flag):
    """pretrain_gpt.py says so on a CPU, and --no-host-memory-reuse leaves glibc alone."""
    run = TINY_MODEL + ["--train-iters", "1"] + flag
    result = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt.py"), *run],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    said = " > host memory: freed memory kept for the next step" in result.stdout
    assert said == (not flag), result.stdout[-2000:]
