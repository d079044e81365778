"""Keep freed memory in the process, so that training steps stop re-faulting their working set.

A training step allocates its activations on the way forward (tens of MB
for the demo model) and frees them on the way back. glibc's ``malloc``
returns freed memory at the top of its heap to the operating system as soon
as more than its trim threshold is free. It sets that threshold to twice the
largest block freed so far, about 4 MB here. Every step then gets fresh
pages from the kernel for its whole working set, and each first touch of a
page is a page fault: about 5700 per float64 step of the demo model, a
quarter of the step's time on a 2-core virtual machine, and a third for the
plain layer functions, which allocate more.

:func:`keep_freed_memory` raises both thresholds once for the process. It
changes only how much freed memory the process keeps for reuse (at most the
peak it has used), never what is computed.
"""

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest accepted M_MMAP_THRESHOLD on 64-bit systems


def keep_freed_memory(trim_threshold=1 << 30, mmap_threshold=MMAP_THRESHOLD_MAX):
    """Ask glibc's ``malloc`` to keep up to ``trim_threshold`` bytes of freed memory; return True if it applied.

    Blocks below ``mmap_threshold`` bytes then come from the reusable heap
    instead of fresh ``mmap`` pages. Setting the thresholds also turns off
    glibc's own adjustment of them. Other C libraries (macOS, musl) are
    left alone and the function returns False.
    """
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_MAX:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD_MAX}] bytes, got {mmap_threshold}")
    if not 0 < trim_threshold < 2**31:
        raise ValueError(f"trim_threshold must be in (0, 2**31) bytes, got {trim_threshold}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    applied = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and applied
