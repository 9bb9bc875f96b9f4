"""Keep freed memory in the process so that decoding does not page-fault every step.

Each attention layer of a grouped-query model (SmolLM2, Llama) expands its keys and values to
every query head before attention (transformers' ``repeat_kv`` on CPU): a fresh
``[batch, heads, kv_len, head_dim]`` tensor per layer per forward, megabytes each. glibc's default
``malloc`` hands such blocks back to the operating system on ``free`` (they are served by ``mmap``,
or trimmed from the top of the heap), so the next forward faults the same memory in again, page
by page. Measured on this project's 2-core CPU with SmolLM2-135M, batch 4, 832 cached tokens and
2 new per row: 190 ms per forward by default, 90 ms once freed blocks stay in the heap
(``python benchmarks/bench_allocator.py``).

:func:`retain_freed_memory` raises glibc's mmap threshold to its maximum (32 MiB) and switches
heap trimming off. The cost is that the process keeps its peak heap instead of shrinking after a
big batch. It is process-wide, so :class:`adaptk.decoding.kv.ModelRunner` applies it once when it
is created unless ``ADAPTK_RETAIN_FREED_MEMORY=0`` is set; on anything but glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc caps M_MMAP_THRESHOLD at HEAP_MAX_SIZE / 2, which is 32 MiB on 64-bit systems.
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_NEVER = (1 << 31) - 1

_applied: bool | None = None  # None: not tried yet


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB in the heap and never trim it.

    Returns True when the setting is in effect (now or from an earlier call), False when it
    cannot apply: not Linux/glibc, or ``ADAPTK_RETAIN_FREED_MEMORY=0`` in the environment.
    Safe to call any number of times.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("ADAPTK_RETAIN_FREED_MEMORY", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on a rejected value.
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _applied
