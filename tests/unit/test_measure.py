import platform
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from lowbit.measure import (
    bits_per_param, current_rss_bytes, disk_bytes, latency_summary, peak_rss_bytes, release_free_heap, reset_peak_rss, time_rounds, weight_bytes,
)


def test_weight_bytes_counts_parameters_and_buffers_by_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    # linear 200 + 20 fp32; batchnorm weight+bias 40 fp32, running mean/var 40 fp32, num_batches_tracked 1 int64
    assert weight_bytes(model) == (220 + 40 + 40) * 4 + 8


def test_weight_bytes_counts_tied_weights_once_and_int8_as_one_byte():
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    assert weight_bytes(torch.nn.ModuleList([emb, head])) == 100 * 16 * 4
    holder = torch.nn.Module()
    holder.register_buffer("q", torch.zeros(1000, dtype=torch.int8))
    holder.register_buffer("scale", torch.ones(10, dtype=torch.float16))
    assert weight_bytes(holder) == 1000 + 20


def test_bits_per_param_is_derived_from_weight_bytes():
    assert bits_per_param(4000, 1000) == 32.0
    assert bits_per_param(500, 1000) == 4.0


def test_disk_bytes_sums_a_tree(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 23)
    assert disk_bytes(tmp_path) == 123
    assert disk_bytes(tmp_path / "a") == 100


def test_peak_rss_sees_an_allocation_and_reset_forgets_it():
    if not reset_peak_rss():
        pytest.skip("this kernel does not allow resetting the peak RSS")
    base = peak_rss_bytes()
    block = np.ones(300 * 1024 * 1024 // 8)  # 300 MiB, touched
    grown = peak_rss_bytes()
    del block
    assert grown - base > 250 * 1024 * 1024
    reset_peak_rss()
    assert peak_rss_bytes() < grown - 200 * 1024 * 1024


def test_release_free_heap_hands_freed_blocks_back_so_rss_shows_live_memory():
    # ~190 MiB of heap blocks, each followed by a small live one, so free() alone cannot
    # shrink the heap: the RSS stays up until the free blocks are handed back
    blocks, pins = [], []
    for _ in range(3000):
        blocks.append(np.ones(64 * 1024 // 8))
        pins.append(np.ones(1000))
    grown = current_rss_bytes()
    del blocks
    assert current_rss_bytes() > grown - 50 * 1024 * 1024
    release_free_heap()
    assert current_rss_bytes() < grown - 150 * 1024 * 1024


# The malloc tests run in a child: a threshold stays set for the rest of a process, and this one
# runs other tests. Each child touches 40 blocks, frees every other one, and prints the MiB that
# went back to the kernel.
MALLOC_CHILD = textwrap.dedent("""
    import ctypes, sys
    from lowbit.measure import current_rss_bytes, return_free_pages, set_mmap_threshold

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def touch_then_free_every_other(size):
        blocks = [libc.malloc(size) for _ in range(40)]
        for block in blocks:
            libc.memset(block, 1, size)
        peak = current_rss_bytes()
        for block in blocks[::2]:
            libc.free(block)
        return peak
""")

# 3 MiB blocks: with a fixed threshold each is a mapping of its own, handed back at its free.
HALF_FREED_RETURNED_MIB = MALLOC_CHILD + textwrap.dedent("""
    libc.free(libc.malloc(16 << 20))  # freeing a 16 MiB mapping raises glibc's own threshold to 16 MiB
    if sys.argv[1] == "fixed":
        assert set_mmap_threshold(2 << 20)
    peak = touch_then_free_every_other(3 << 20)
    print((peak - current_rss_bytes()) >> 20)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize("threshold, returned_mib", [("glibc's own", (0, 5)), ("fixed", (55, 65))])
def test_a_fixed_mmap_threshold_hands_freed_blocks_back_that_the_heap_would_keep(threshold, returned_mib):
    done = subprocess.run([sys.executable, "-c", HALF_FREED_RETURNED_MIB, threshold], capture_output=True, text=True, check=True)
    low, high = returned_mib  # 20 of 40 blocks of 3 MiB freed: 60 MiB when each had a mapping of its own
    assert low <= int(done.stdout) <= high


# 1 MiB blocks from the heap (under a 2 MiB threshold): the MiB returned at the free, then at
# return_free_pages. The last block stays live at the heap's top, so glibc's own trimming of the
# top has nothing to give back.
HEAP_HOLES_RETURNED_MIB = MALLOC_CHILD + textwrap.dedent("""
    assert set_mmap_threshold(2 << 20)
    peak = touch_then_free_every_other(1 << 20)
    at_free = current_rss_bytes()
    assert return_free_pages()
    print((peak - at_free) >> 20, (at_free - current_rss_bytes()) >> 20)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_return_free_pages_hands_back_the_holes_between_live_heap_blocks():
    done = subprocess.run([sys.executable, "-c", HEAP_HOLES_RETURNED_MIB], capture_output=True, text=True, check=True)
    at_free, trimmed = map(int, done.stdout.split())
    assert at_free <= 2  # freed holes stay resident: this is what grew training's peak step by step
    assert 17 <= trimmed <= 21  # 20 holes of 1 MiB, less the chunk headers' partial pages at their edges


def test_without_proc_memory_readings_fall_back_instead_of_failing(monkeypatch, tmp_path):
    monkeypatch.setattr("lowbit.measure._PROC_STATUS", tmp_path / "missing")
    assert current_rss_bytes() == 0
    assert peak_rss_bytes() > 50 * 1024 * 1024  # getrusage's lifetime peak: this process has loaded torch


def test_time_rounds_runs_warmup_untimed_then_times_every_item_each_round_in_milliseconds():
    calls = []

    def call(i):  # the three warm-up calls are slow (30 ms), the timed ones 2 ms
        calls.append(i)
        time.sleep(0.030 if len(calls) <= 3 else 0.002)

    times = time_rounds(call, items=4, rounds=2, warmup=3)
    assert calls == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3] and times.shape == (2, 4)
    assert (times >= 2.0).all() and (times < 25.0).all()  # milliseconds, warm-up excluded


def test_latency_counts_each_items_fastest_round_so_a_paused_pass_does_not_move_it():
    calls = []

    def call(i):  # item i costs (i + 1) ms; the first round's pass of item 2 is paused 40 ms
        calls.append(i)
        time.sleep((i + 1) / 1000 + (0.040 if len(calls) == 3 else 0.0))

    times = time_rounds(call, items=5, rounds=2, warmup=0)
    assert times[0, 2] > 40.0
    out = latency_summary(times)
    assert out["latency_ms_p50"] == pytest.approx(3.0, abs=1.5)  # item 2's own 3 ms, not the paused 43
    assert out["latency_ms_p95"] < 10.0
    assert latency_summary(times[:1])["latency_ms_p95"] > 30.0  # one round: the pause is in the figures


def test_latency_summary_percentiles():
    out = latency_summary(np.stack([np.arange(1, 101, dtype=float), np.arange(101, 201, dtype=float)]))
    assert out["latency_ms_p50"] == pytest.approx(50.5)
    assert out["latency_ms_p95"] == pytest.approx(95.05)
