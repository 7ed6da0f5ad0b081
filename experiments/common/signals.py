"""SIGINT/SIGTERM as a flag the training loops check between chunks."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from typing import Any

EXIT_INTERRUPTED = 130


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between chunks; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name} received: finishing the current chunk, then saving a "
            "checkpoint (press Ctrl-C again to abort without saving)",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
