"""Reusing freed host memory when training on CPUs.

glibc's ``malloc`` serves every block of 32 MB or more with its own ``mmap`` and gives it back
to the operating system on ``free``; it also hands the free top of its heap back once that
passes a threshold. A training step frees and re-allocates the same tensors every iteration
(the logits and their gradient, the loss's temporaries, activations), so on a CPU each step
page-faults all that memory in again. On issue 13's benchmark shape that is about 15% of a
step, for this framework and for ``transformers`` alike (``tools/benchmark_training.py``
times both with and without this setting).

:func:`reuse_freed_memory` tells glibc to take every block from its heap and never trim it:
freed memory is reused by the next step. Resident memory then stays at the run's peak, which
training reaches every step anyway. ``pretrain_gpt.py`` does this when it trains on the CPU,
unless ``--no-host-memory-reuse`` is given.
"""

import ctypes

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4


def _glibc():
    """The process's C library when it is glibc, else None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def reuse_freed_memory() -> bool:
    """Keep freed memory in the process for reuse: no ``mmap`` for large blocks, no trimming
    of the heap (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``). Returns
    whether it took effect (False where the C library is not glibc). Process-wide and for
    the rest of the process's life."""
    libc = _glibc()
    if libc is None:
        return False
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
