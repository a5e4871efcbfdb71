"""Handing the C heap's free pages back to the OS after a large load (:func:`trim`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


def trim() -> bool:
    """Give the free pages of the C heap back to the OS (glibc's ``malloc_trim``): glibc keeps
    what a load freed resident, in the middle of its heaps. Loading the model's session leaves
    60 MiB of that behind, and a 1M-memory store 80 MiB in all once the model, the vector
    index and the keyword postings are loaded (measured). Blocking (milliseconds). False where
    the C library has no such call."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
