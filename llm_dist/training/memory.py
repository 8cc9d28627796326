"""Host memory: make glibc give freed memory back (each rank's peak is measured in tracking/meters.py).

Why (docs/bench_classify_zero.md §2): ZeRO-3 gathers and frees full parameters layer by layer every
step. glibc's malloc raises its mmap threshold after large frees (up to 32 MiB), so those buffers
then come from the heap and stay there: RSS records the allocator's high-water mark, not live
tensors, and ZeRO-3's saving does not show. Fixing the thresholds (the documented
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, set here with mallopt so every launcher gets it)
makes RSS follow live memory. On CUDA the caching allocator holds the tensors and this is moot.

It is not free: every tensor above 128 KiB is then a fresh mmap, page-faulted on first touch. Measured
(bench/malloc_release.py, 2 CPU cores): tokens/s 0.73x for a single process and 0.77x for 2-rank ZeRO-3,
peak RSS 0.75x and 0.64x. Raising the threshold to 16 MiB keeps the speed and loses the saving (the
large tensors are both). So `auto` turns it on only where memory is what the run asked for: DeepSpeed
ZeRO-3 without CUDA.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
RELEASE_THRESHOLD = 128 * 1024  # glibc's initial mmap threshold, kept fixed instead of adapting upwards


def configure_malloc(mode: str, zero_stage: int | None = None) -> bool:
    """`mode` auto | yes | no (config `malloc_release`; auto = yes for ZeRO-3 without CUDA); True when glibc
    was told. A no-op off glibc."""
    if mode == "auto":
        mode = "yes" if zero_stage == 3 and not torch.cuda.is_available() else "no"
    if mode == "no" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD) == 1
        return bool(ok and libc.mallopt(M_TRIM_THRESHOLD, RELEASE_THRESHOLD) == 1)
    except (OSError, AttributeError):  # not glibc (musl, …)
        return False
