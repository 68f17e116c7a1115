"""The status writer: a stalled reader of stdout never blocks the loop."""

from __future__ import annotations

import io
import threading
import time

from bms.app import LineWriter


class StuckStream(io.StringIO):
    """stdout whose reader stopped reading: every write blocks until released."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def write(self, text):
        self.release.wait()
        return super().write(text)


def test_writes_never_block_and_overflow_is_counted():
    stream = StuckStream()
    writer = LineWriter(stream, max_lines=10)
    started = time.monotonic()
    for n in range(50):
        writer.write(f"line {n}")
    assert time.monotonic() - started < 0.5
    assert 39 <= writer.dropped <= 40  # the queue holds 10, the thread may hold one more
    stream.release.set()
    writer.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "line 0" and len(lines) == 50 - writer.dropped


def test_close_flushes_everything_queued():
    stream = io.StringIO()
    writer = LineWriter(stream)
    for n in range(20):
        writer.write(str(n))
    writer.close()
    assert stream.getvalue().split() == [str(n) for n in range(20)]
