"""engine.gcpolicy: thresholds applied, full collections still happen, bad settings refused."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import gevent
import gevent.event
import pytest

from engine import gcpolicy
from engine.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def restore_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_young_collections_rarer_and_no_automatic_full_collection() -> None:
    gc.set_threshold(700, 10, 10)
    gcpolicy.apply(5000)
    assert gc.get_threshold() == (5000, 10, gcpolicy.NO_AUTOMATIC_FULL_COLLECTION)


def test_zero_keeps_the_interpreter_defaults() -> None:
    gc.set_threshold(700, 10, 10)
    gcpolicy.apply(0)
    assert gc.get_threshold() == (700, 10, 10)


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_cyclic_garbage_is_still_collected_by_the_periodic_full_collection() -> None:
    gcpolicy.apply(10**9)  # nothing automatic at all during this test
    stop = gevent.event.Event()
    worker = gevent.spawn(gcpolicy.run_full_collections, 0.01, stop)
    garbage = Node()
    alive = weakref.ref(garbage)
    del garbage
    try:
        for _ in range(500):
            if alive() is None:
                break
            gevent.sleep(0.01)
        assert alive() is None
    finally:
        stop.set()
        worker.join(timeout=5)
    assert worker.dead


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CALLGATE_ENGINE__GC_YOUNG_THRESHOLD", "-1"),
        ("CALLGATE_ENGINE__GC_FULL_INTERVAL", "0"),
        ("CALLGATE_ENGINE__ENTITY_CACHE", "0"),  # engine.rules.packed's cache bound, same family
    ],
)
def test_bad_settings_are_refused_at_start(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable.removeprefix("CALLGATE_ENGINE__").lower()):
        load_config(environ={variable: value})


def test_defaults_enable_the_policy() -> None:
    engine = load_config(environ={}).engine
    assert engine.gc_young_threshold == 5000 and engine.gc_full_interval == 300.0
