"""The memory and cold-start benchmark's measuring pieces (loadtest/memory.py)."""

from __future__ import annotations

import os
import socket
import time

from loadtest.memory import StartWatch, describe, is_listening, process_memory


def test_process_memory_reads_rss_pss_and_peak_of_a_live_process() -> None:
    ballast = bytearray(64 * 1024 * 1024)  # touched: 64 MiB resident
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    memory = process_memory(os.getpid())
    assert memory["rss_mb"] >= 64 and memory["peak_rss_mb"] >= memory["rss_mb"]
    assert 0 < memory["pss_mb"] <= memory["rss_mb"] + 1
    assert memory["anon_mb"] >= 64 and memory["shmem_mb"] >= 0  # the ballast is anonymous memory
    del ballast


def test_process_memory_of_a_gone_process_is_empty() -> None:
    assert process_memory(2**22 + 12345) == {}


def test_start_watch_keeps_the_first_times_and_a_decision_implies_listening() -> None:
    watch = StartWatch(time.monotonic() - 2.0)
    watch.saw_decision()
    first = watch.as_dict()
    assert first["listening_s"] == first["first_decision_s"]
    assert first["first_decision_s"] is not None and first["first_decision_s"] >= 2.0
    watch.saw_listening()
    watch.saw_decision()
    assert watch.as_dict() == first
    line = describe(
        first, [{"rss_mb": 10.0, "anon_mb": 7.0, "shmem_mb": 2.0, "pss_mb": 5.0, "peak_rss_mb": 12.0}, {}]
    )
    assert "first decision 2." in line and "n/a" in line
    assert "RSS 10.0 MB (anonymous 7.0 MB, shared memory 2.0 MB) PSS 5.0 MB peak 12.0 MB" in line


def test_is_listening_tells_a_listening_port_from_a_bound_one() -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        assert not is_listening(bound.getsockname()[1])
        bound.listen(1)
        assert is_listening(bound.getsockname()[1])


def test_release_free_memory_gives_freed_heap_pages_back() -> None:
    from engine.state.watcher import release_free_memory

    chunks = [bytes(1000) + str(n).encode() for n in range(200_000)]  # ~200 MB from malloc, not pymalloc
    pin = [bytes(1000) + b"pin" for _ in range(10)]  # allocated above them: the heap top stays in use
    del chunks
    before = process_memory(os.getpid())["rss_mb"]
    release_free_memory()
    after = process_memory(os.getpid())["rss_mb"]
    assert before - after >= 100, (before, after)
    assert pin
