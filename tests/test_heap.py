"""gm.heap.trim: the C heap's free pages go back to the OS (the process's resident memory falls)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from pathlib import Path

import pytest

from gm import heap

BLOCK = 16 << 10  # below glibc's mmap threshold: served from the heap, kept there once freed
BLOCKS = 6_000  # ~94 MiB


def resident_anonymous() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_trim_gives_the_pages_a_load_freed_back_to_the_os() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)  # (touched: resident)
    for block in blocks[:-1]:  # the last one stays: the freed pages lie below it, not at the heap's top
        libc.free(block)
    before = resident_anonymous()
    assert heap.trim()
    after = resident_anonymous()
    libc.free(blocks[-1])
    assert before - after > BLOCK * BLOCKS // 2, (before, after)
