"""engine.state.batches: the batch loop of the settler and the event publisher, without Redis."""

from __future__ import annotations

from engine.state.batches import BatchQueue


class Unreachable(Exception):
    pass


class Sink:
    """A send() that fails ``failures`` times, then records the batches it is given."""

    def __init__(self, failures: int = 0, *, forever: bool = False) -> None:
        self.failures = failures
        self.forever = forever
        self.batches: list[list[int]] = []
        self.attempts = 0

    def send(self, batch: list[int]) -> None:
        self.attempts += 1
        if self.forever or self.failures:
            self.failures -= 1
            raise Unreachable("down")
        self.batches.append(list(batch))


class FakeStop:
    """A stop event whose wait() returns at once (no real backoff) and counts the delays asked."""

    def __init__(self) -> None:
        self.set_now = False
        self.delays: list[float] = []

    def is_set(self) -> bool:
        return self.set_now

    def wait(self, timeout: float | None = None) -> bool:
        self.delays.append(timeout or 0.0)
        return self.set_now


def make(sink: Sink, abandoned: list[list[int]], **kw: object) -> BatchQueue[int]:
    options: dict = {"queue_size": 10, "batch_size": 4, "retry_max": 0.4, "idle_wait": 0.01, **kw}
    return BatchQueue("items", send=sink.send, retryable=(Unreachable,), abandon=abandoned.append, **options)


def test_a_full_queue_refuses_without_blocking() -> None:
    batches = make(Sink(), [], queue_size=2)
    assert batches.put(1) and batches.put(2)
    assert not batches.put(3)
    assert batches.pending == 2


def test_batches_are_cut_at_batch_size_and_all_sent_before_stopping() -> None:
    sink = Sink()
    abandoned: list[list[int]] = []
    batches = make(sink, abandoned)
    for item in range(10):
        batches.put(item)
    stop = FakeStop()
    stop.set_now = True  # already stopping: what is queued still gets its attempt
    batches.run(stop)
    assert sink.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert abandoned == [] and batches.pending == 0


def test_a_failed_batch_is_retried_whole_with_doubling_delays_capped() -> None:
    sink = Sink(failures=5)
    abandoned: list[list[int]] = []
    batches = make(sink, abandoned)
    for item in range(3):
        batches.put(item)
    fake = FakeStop()

    class Stopper(FakeStop):
        def is_set(self) -> bool:  # stop once the batch went through
            return bool(sink.batches)

        def wait(self, timeout: float | None = None) -> bool:
            return fake.wait(timeout)

    batches.run(Stopper())
    assert sink.batches == [[0, 1, 2]] and sink.attempts == 6
    assert fake.delays == [0.05, 0.1, 0.2, 0.4, 0.4]
    assert batches.failures == 0 and batches.pending == 0 and abandoned == []


def test_at_stop_a_batch_that_still_fails_is_abandoned_once() -> None:
    sink = Sink(forever=True)
    abandoned: list[list[int]] = []
    batches = make(sink, abandoned)
    for item in range(3):
        batches.put(item)
    stop = FakeStop()
    stop.set_now = True
    batches.run(stop)
    assert abandoned == [[0, 1, 2]] and sink.attempts == 1
    assert batches.pending == 0 and batches.failures == 1


def test_with_gather_items_arriving_after_the_first_share_its_batch() -> None:
    """The settler's gather: the batch waits after its first item, so items put meanwhile
    (one every few ms, as hangups below saturation) go in one send, not one each."""
    import threading
    import time

    sink = Sink()
    abandoned: list[list[int]] = []
    batches = make(sink, abandoned, gather=0.3, idle_wait=5.0)
    stop = FakeStop()
    runner = threading.Thread(target=batches.run, args=(stop,))
    runner.start()
    for item in range(3):
        batches.put(item)
        time.sleep(0.02)
    deadline = time.monotonic() + 5
    while not sink.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set_now = True
    runner.join(timeout=10)
    assert sink.batches[0] == [0, 1, 2]
    assert not abandoned


def test_without_gather_the_first_item_leaves_at_once() -> None:
    import threading
    import time

    sink = Sink()
    abandoned: list[list[int]] = []
    batches = make(sink, abandoned, idle_wait=5.0)
    stop = FakeStop()
    runner = threading.Thread(target=batches.run, args=(stop,))
    runner.start()
    batches.put(0)
    deadline = time.monotonic() + 5
    while not sink.batches and time.monotonic() < deadline:
        time.sleep(0.005)
    batches.put(1)
    time.sleep(0.05)
    stop.set_now = True
    runner.join(timeout=10)
    assert sink.batches[0] == [0]
    assert [item for batch in sink.batches for item in batch] == [0, 1]


def test_a_stopping_queue_does_not_gather() -> None:
    """At shutdown what is queued leaves at once, whatever the gather."""
    import time

    sink = Sink()
    abandoned: list[list[int]] = []
    batches = make(sink, abandoned, gather=30.0)
    batches.put(1)
    stop = FakeStop()
    stop.set_now = True
    started = time.monotonic()
    batches.run(stop)
    assert sink.batches == [[1]]
    assert time.monotonic() - started < 10  # not the 30 s gather
