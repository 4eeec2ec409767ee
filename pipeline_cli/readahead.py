"""A bounded producer thread: the pipeline's one way to overlap making items with using them.

sync-odata fetches the next OData page while this one is loaded, and gen-virtual formats the
next COPY chunk while PostgreSQL takes this one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_END = object()
JOIN_S = 2.0


class ReadAhead(Generic[T]):
    """Iterate ``items`` in a thread, at most ``depth`` items ahead of the consumer.

    An exception in the producer is re-raised in the consumer, in order. ``close()`` (or
    leaving a ``with`` block) stops the producer at its next item and joins it; the source is
    closed in the producer thread when it has a ``close()``.
    """

    def __init__(self, items: Iterable[T], depth: int, name: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name,
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        # Bounded: a consumer stopped early (an error, the run's hard limit) must not wait for
        # an item still being made (a request in flight); the daemon thread drops it.
        self._thread.join(timeout=JOIN_S)

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
