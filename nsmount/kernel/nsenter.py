"""Run Python code inside another process's mount namespace.

``setns(CLONE_NEWNS)`` fails with EINVAL in a thread whose fs_struct is shared,
i.e. in every thread of a multithreaded process.  A fresh worker thread that first
calls ``unshare(CLONE_FS)`` owns its own root/cwd and may setns; only that thread
moves.  Workers are never handed back to the caller's namespace: they die with
the pool, so nothing else can run with a VM's root by accident.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from . import consts as C
from . import syscalls

T = TypeVar("T")


def _enter(ns_fd: int) -> None:
    syscalls.setns(ns_fd, C.CLONE_NEWNS)


def call_in_mntns(ns_fd: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` in a new thread inside the mount namespace of
    ``ns_fd`` (a pidfd or an ``/proc/PID/ns/mnt`` fd); return its value or re-raise
    its exception in the caller."""
    box: dict[str, Any] = {}

    def worker() -> None:
        try:
            syscalls.unshare(C.CLONE_FS)
            _enter(ns_fd)
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=worker, name="nsmount-ns-worker")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class NamespacePool:
    """Worker threads that own their fs_struct (``unshare(CLONE_FS)`` at start), so the
    jobs given to them may setns into one VM after another.

    A job must setns itself (into the host first when it needs host paths): a reused
    worker is in whatever namespace its previous job left it.  Reconnect runs one such
    worker per process; parallelism comes from forked processes, not threads (the
    work is GIL-bound).
    """

    def __init__(self, jobs: int = 1) -> None:
        self._pool = cf.ThreadPoolExecutor(
            max_workers=max(1, jobs), thread_name_prefix="nsmount-ns",
            initializer=syscalls.unshare, initargs=(C.CLONE_FS,),
        )

    def submit(self, fn: Callable[..., T], *args: Any) -> cf.Future[T]:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NamespacePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
