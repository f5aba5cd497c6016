"""The public library API (issue 9), called as a launcher or a VM manager would, inside
a sandbox: every function twice, typed results, errors as NsmountError only."""

from __future__ import annotations

import os
import signal
from typing import Any

import nsmount

from vmhelpers import emit, mount_hugetlbfs, start_vm


def api_twice() -> None:
    mount_hugetlbfs("/dev/hugepages")
    vm = start_vm("api", 5, devices=["/dev/loop0"], hugepages=True)
    pid = vm.pid
    seen: dict[str, Any] = {}
    for i in range(2):
        o = nsmount.inspect(pid)
        seen[f"inspect{i}"] = (type(o).__name__, o.status, isinstance(o, nsmount.Outcome))
        o = nsmount.repair(pid, dry_run=True)
        seen[f"repair_dry{i}"] = (type(o).__name__, o.status)
        o = nsmount.repair(pid)
        seen[f"repair{i}"] = (type(o).__name__, o.status)
        o = nsmount.device_add(pid, ["/dev/loop1"])
        seen[f"add{i}"] = (type(o).__name__, o.status)
        o = nsmount.device_remove(pid, ["/dev/loop1"])
        seen[f"remove{i}"] = (type(o).__name__, o.status)
        r = nsmount.reconnect(scan=False)
        seen[f"reconnect{i}"] = (type(r).__name__, r.summary()["failed"],
                                 isinstance(r, nsmount.Report))
    # no deadline: in-process (no worker), same result
    o = nsmount.device_add(pid, ["/dev/loop3"], timeout=None)
    seen["add_inproc"] = (type(o).__name__, o.status)
    o = nsmount.device_remove(pid, ["/dev/loop3"], timeout=None)
    seen["remove_inproc"] = (type(o).__name__, o.status)
    # bad input: always an NsmountError, never TypeError/AttributeError/OSError
    errors = {}
    for what, call in {
        "spec-not-a-spec": lambda: nsmount.launch("nope", ["true"]),  # type: ignore[arg-type]
        "devices-a-string": lambda: nsmount.VmSpec(devices="/dev/loop0"),  # type: ignore[arg-type]
        "paths-a-string": lambda: nsmount.device_add(pid, "/dev/loop1"),  # type: ignore[arg-type]
        "timeout-negative": lambda: nsmount.repair(pid, timeout=-1),
        "jobs-zero": lambda: nsmount.reconnect(jobs=0),
        "bad-target": lambda: nsmount.inspect("no/such"),
        "no-such-pid": lambda: nsmount.repair(4_000_000),
    }.items():
        try:
            call()
            errors[what] = "no error"
        except nsmount.NsmountError as exc:
            errors[what] = type(exc).__name__
        except Exception as exc:  # the defect this test is about
            errors[what] = f"RAW {type(exc).__name__}: {exc}"
    # a VM that exits: repair raises, reconnect reports nothing failed for it
    os.kill(pid, signal.SIGKILL)
    vm.wait()
    try:
        nsmount.repair(pid)
        gone = "no error"
    except nsmount.NsmountError as exc:
        gone = type(exc).__name__
    r = nsmount.reconnect(scan=False)
    # Launched: poll, send_signal, wait, context manager
    spec = nsmount.VmSpec(name="l", devices=["/dev/loop2"])  # plain strings accepted
    with nsmount.launch(spec, ["sleep", "1000"]) as child:
        running = child.poll()
        child.send_signal(signal.SIGTERM)
    emit(seen=seen, errors=errors, gone=gone, after_exit=r.summary(),
         after_exit_pids=[o.pid for o in r.outcomes], launched=[running, child.returncode,
                                                                child.pidfd])
