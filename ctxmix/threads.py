"""The one extra thread ctxmix works on beside the caller's (its kernels release the GIL there).

Text mode encodes the second half of a file on it while the caller encodes the first; the exact n-gram
expert inserts the short n-grams of blocks ahead on it while the caller counts. The two never overlap
within one run, so a single thread serves both, created on first use and kept (a pool started and
shut down per call cost 145-165 us against 10-70 us for a task on the kept thread, measured).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor


def second_thread() -> ThreadPoolExecutor:
    """The process's extra worker thread. Keyed by process id: a forked child has no copy of the
    parent's thread, so it gets its own."""
    return _worker_of(os.getpid())


@functools.lru_cache(maxsize=1)
def _worker_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ctxmix-{pid}")
