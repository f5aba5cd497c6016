"""A tiny single-threaded epoll reactor with timers.

Nothing here polls: the loop sleeps in ``epoll_wait`` until an fd is ready or the
next timer is due.  (``selectors`` cannot register ``EPOLLPRI`` alone, which the
``/proc/self/mountinfo`` fallback needs.)  A callback that raises is logged and the
loop goes on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable

log = logging.getLogger("nsmount.service")

IN = select.EPOLLIN
OUT = select.EPOLLOUT
PRI = select.EPOLLPRI


class Timer:
    __slots__ = ("cancelled", "cb", "when")

    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when = when
        self.cb = cb
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._masks: dict[int, int] = {}  # what epoll has for each fd
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.running = False

    def add(self, fd: int, mask: int, cb: Callable[[int], None]) -> None:
        self.ep.register(fd, mask)
        self.handlers[fd] = cb
        self._masks[fd] = mask

    def modify(self, fd: int, mask: int) -> None:
        """A connection asks after every answer it sends: only a change is a syscall."""
        if self._masks.get(fd) != mask:
            self.ep.modify(fd, mask)
            self._masks[fd] = mask

    def remove(self, fd: int) -> None:
        self._masks.pop(fd, None)
        if self.handlers.pop(fd, None) is not None:
            try:
                self.ep.unregister(fd)
            except (OSError, ValueError):
                pass

    def call_later(self, delay: float, cb: Callable[[], None]) -> Timer:
        t = Timer(time.monotonic() + max(0.0, delay), cb)
        heapq.heappush(self._timers, (t.when, next(self._seq), t))
        return t

    def stop(self) -> None:
        self.running = False

    def run(self) -> None:
        self.running = True
        while self.running:
            timeout = -1.0
            while self._timers and self._timers[0][2].cancelled:
                heapq.heappop(self._timers)
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            events = self.ep.poll(timeout)
            for fd, mask in events:
                cb = self.handlers.get(fd)
                if cb is None:
                    continue
                try:
                    cb(mask)
                except Exception:
                    log.exception("internal error in an event handler")
            now = time.monotonic()
            while self._timers and (self._timers[0][0] <= now or self._timers[0][2].cancelled):
                _, _, t = heapq.heappop(self._timers)
                if t.cancelled:
                    continue
                try:
                    t.cb()
                except Exception:
                    log.exception("internal error in a timer")

    def close(self) -> None:
        self.ep.close()
