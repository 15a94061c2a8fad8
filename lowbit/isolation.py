"""Measurements that cannot depend on what ran before them: each in a child process of its own.

    with Isolated(preload=["lowbit.evaluation"]) as isolated:
        floor = isolated.floor(test_frame)                        # peak RSS of a child that loads no model
        result, peak = isolated.call(evaluate, variant_dir, test_frame, threads=2)
        serving = peak - floor

Why: measured one after another in one process, each variant's peak RSS carried what earlier
variants left behind (allocator arenas, caches, lazily imported libraries): after five variants
NF4 read 36% above FP32, while alone it needs the same. Here one forkserver imports the libraries
once; every call runs in a fresh child forked from that server, which has never loaded a model,
and the child exits after one call (max_tasks_per_child=1). A call's figures are therefore the same
whatever ran before it, and starting a child costs a fork, not a second import of torch.

The floor is a child that receives the same data and loads nothing: the interpreter with the
preloaded libraries. `peak − floor` is what the call itself added: its model's tensors, the
activations and workspaces of its forward passes, and the libraries it imported on the way.

A forked child holds the server's anonymous memory in its RSS (page tables are copied) but not
the libraries' file-backed pages (shared code and read-only data are mapped again on first touch):
a child read 8 MiB of file pages where a fresh process with the same imports holds 153 MiB, so the
floor read 24% low and the first forward pass charged library code to the model. So this module,
preloaded last, lists the file pages resident in the server after its imports
(FILE_PAGES_AT_IMPORT), and each child touches them before its peak is reset: its figures are then
those of a fresh process that imported the same libraries (bench/truth.py checks them against one).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.measure import peak_rss_bytes, release_free_heap, reset_peak_rss


def resident_file_pages() -> np.ndarray:
    """Addresses of this process's resident pages of mapped files (libraries, their data), from
    /proc/self/maps and /proc/self/pagemap (bit 63: present). Empty where Linux's /proc is not there."""
    page = os.sysconf("SC_PAGE_SIZE")
    found = [np.empty(0, dtype=np.uint64)]
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                fields = line.split()
                # readable mappings of real files; devices (/dev/...) are not memory to count
                if len(fields) < 6 or "r" not in fields[1] or not fields[5].startswith("/") or fields[5].startswith("/dev/"):
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                pagemap.seek(start // page * 8)
                entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
                present = np.nonzero(entries >> np.uint64(63))[0].astype(np.uint64)
                found.append(np.uint64(start) + present * np.uint64(page))
    except OSError:
        pass
    return np.concatenate(found)


# Taken when this module is imported; in the forkserver that is after every other preloaded module.
FILE_PAGES_AT_IMPORT = resident_file_pages()


def remember_resident_pages() -> None:
    """Take FILE_PAGES_AT_IMPORT again, for a server that imported more after this module."""
    global FILE_PAGES_AT_IMPORT
    FILE_PAGES_AT_IMPORT = resident_file_pages()


def as_if_fresh_process() -> None:
    """In a child forked from a server that imported libraries: make its memory figures those of a
    fresh process with the same imports (the library pages such a process holds, freed heap
    returned, the peak counted from here: the server's import-time transients are not the child's)."""
    for address in FILE_PAGES_AT_IMPORT.tolist():
        ctypes.string_at(address, 1)
    release_free_heap()
    reset_peak_rss()


def _measured(fn: Callable, args: tuple, kwargs: dict, threads: int | None) -> tuple[Any, int]:
    """In the child: run fn and return (its result, this process's peak RSS over the call)."""
    if threads:
        torch.set_num_threads(threads)
    as_if_fresh_process()
    result = fn(*args, **kwargs)
    return result, peak_rss_bytes()


def _load_nothing(*_data: Any) -> None:
    """The floor's call: receives the same data as a measured call (so unpickling it counts in both)."""


class Isolated:
    """One forkserver with `preload` imported; each call in a fresh child forked from it."""

    def __init__(self, preload: list[str]) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([*preload, __name__])  # this module last: see FILE_PAGES_AT_IMPORT
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1)

    def call(self, fn: Callable, *args: Any, threads: int | None = None, **kwargs: Any) -> tuple[Any, int]:
        """(fn(*args, **kwargs), peak RSS bytes of the child that ran it). fn must be importable
        (a module-level function); an exception in the child is raised here."""
        try:
            return self._pool.submit(_measured, fn, args, kwargs, threads).result()
        except BrokenProcessPool:
            what = f"{fn.__name__}({args[0]!r}, ...)" if args else f"{fn.__name__}()"
            raise LowbitError(
                f"the child process running {what} died before answering: killed (out of memory? see "
                "`dmesg`) or crashed in a native library; nothing was written") from None

    def floor(self, *data: Any) -> int:
        """Peak RSS bytes of a child that imported the preloaded libraries, received `data` and did nothing else."""
        return self.call(_load_nothing, *data)[1]

    def __enter__(self) -> "Isolated":
        return self

    def __exit__(self, *_exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
