#!/usr/bin/env python3
"""The floor of a reconnect in Python: bench/floor_reconnect.c's loop, step for step
(pidfd_open, setns(CLONE_NEWNS), mkdir, mount hugetlbfs, mkdir -p the per-domain
dir), with nsmount's ctypes syscall layer and no checks, no planning, one process.

    floor_reconnect.py MOUNTPOINT < VMS

What the interpreter itself costs for the bare steps, so bench/bench_floor.py can show
how much of the service's time is Python and how much is nsmount's pipeline.  Same
input and output as the C program (one JSON line: vms, failed, loop_ns).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsmount.kernel import consts as C
from nsmount.kernel import syscalls


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        pass


def one(pid: int, dom: int, name: str, mp: str) -> None:
    fd = os.pidfd_open(pid)
    try:
        syscalls.setns(fd, C.CLONE_NEWNS)
        _mkdir(mp)
        syscalls.mount("nodev", mp, "hugetlbfs", 0, "pagesize=2M")
        _mkdir(f"{mp}/libvirt")
        _mkdir(f"{mp}/libvirt/qemu")
        _mkdir(f"{mp}/libvirt/qemu/{dom}-{name}")
    finally:
        os.close(fd)


def main() -> int:
    mp = sys.argv[1]
    vms = [(int(p), int(i), n) for p, i, n in (ln.split() for ln in sys.stdin if ln.strip())]
    syscalls.unshare(C.CLONE_FS)  # setns(CLONE_NEWNS) refuses a shared fs_struct
    failed = 0
    t0 = time.perf_counter_ns()
    for pid, dom, name in vms:
        try:
            one(pid, dom, name, mp)
        except OSError as exc:
            failed += 1
            if failed <= 5:
                print(f"pid {pid}: {exc}", file=sys.stderr)
    loop = time.perf_counter_ns() - t0
    print(json.dumps({"vms": len(vms), "failed": failed, "loop_ns": loop}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
