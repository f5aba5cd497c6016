"""``nsmount serve`` under a uevent storm and a flapping mount: a converged end state,
a service that keeps answering, coalesced work and bounded memory.

Real kernel uevents: ``echo change > /sys/block/loop6/uevent`` (a synthetic uevent the
kernel broadcasts to every listener on the machine; it changes no device).  There is no
udev in the sandbox: the test makes and removes the host's node itself, as udev would,
between the events.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from scenarios.serve import (
    LOG,
    assert_no_traceback,
    listed,
    serve,
    settle,
    talk,
    visible_hugetlbfs,
)
from vmhelpers import comm, emit, read_text, sh, start_vms, wait_for

DEV = "/dev/loop6"
UEVENT = "/sys/block/loop6/uevent"
EVENTS = 1000


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (/proc/PID/status of the service: ours, not a VM's)."""
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def make_node(rdev: tuple[int, int]) -> None:
    if os.path.lexists(DEV):
        os.unlink(DEV)
    os.mknod(DEV, 0o660 | stat.S_IFBLK, os.makedev(*rdev))
    os.chown(DEV, 0, 6)


def vm_node(pid: int) -> tuple[int, int] | None:
    """(major, minor) of the VM's /dev/loop6, None when it has none."""
    try:
        st = os.stat(f"/proc/{pid}/root{DEV}")
    except FileNotFoundError:
        return None
    assert stat.S_ISBLK(st.st_mode), oct(st.st_mode)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def storm(n: int, changes: dict[int, Any]) -> float:
    """``n`` change uevents for loop6; ``changes[k]`` runs before event k (the host's
    node made, changed or removed in the middle of the storm).  Returns its seconds."""
    t0 = time.perf_counter()
    fd = os.open(UEVENT, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for k in range(n):
            if k in changes:
                changes[k]()
            os.write(fd, b"change")
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def counters() -> dict[str, Any]:
    c = talk({"op": "status"})["result"]["counters"]
    return {"batches": c["batches"], "uevents": c["events"].get("uevent", 0),
            "unchanged": c["events"].get("uevent-unchanged", 0),
            "overflows": c["events"].get("uevent-overflow", 0), "repairs": c["repairs"]}


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: b[k] - a[k] for k in a}


def uevent_storm() -> None:
    import nsmount

    if os.path.lexists(DEV):
        os.unlink(DEV)  # the optional device is not on the host yet
    svc = serve()
    with_dev = []
    for i in range(3):
        spec = nsmount.VmSpec(name=f"dev{i}", domain_id=100 + i).with_devices([DEV], False)
        with_dev.append(nsmount.launch(spec, ["sleep", "1000"]))
    for vm in with_dev:
        wait_for(lambda vm=vm: comm(vm.pid) == "sleep", "VM start", 20)
    plain = start_vms(3)
    pids = [vm.pid for vm in with_dev]
    wait_for(lambda: set(pids) | {v.pid for v in plain.values()} <= set(listed()[1]),
             "the service to track all VMs", 20)
    settle()
    assert all(vm_node(p) is None for p in pids)

    def converged(want: tuple[int, int] | None) -> bool:
        return all(vm_node(p) == want for p in pids)

    def flip(k: int) -> None:
        make_node((7, 6) if k % 2 else (7, 7))
        time.sleep(0.001)  # the service reads each event before the node changes again

    rounds, rss = [], []
    for r in range(2):
        # quiet storm: the node appears (7:6) before the first event, is removed at
        # event 300, comes back as 7:7 at event 600; most events change nothing
        c0 = counters()
        storm(EVENTS, {0: lambda: make_node((7, 6)), 300: lambda: os.unlink(DEV),
                       600: lambda: make_node((7, 7))})
        wait_for(lambda: converged((7, 7)), f"loop6 = 7:7 in the VMs (round {r})", 30)
        settle()
        c1 = counters()
        # the node goes: a few events, the VMs lose it
        os.unlink(DEV)
        storm(5, {})
        wait_for(lambda: converged(None), f"loop6 gone from the VMs (round {r})", 20)
        settle()
        # busy storm: the node changes before every event (7:7 / 7:6, 7:6 at the end)
        c2 = counters()
        t = time.perf_counter()
        storm(EVENTS, {k: (lambda k=k: flip(k)) for k in range(EVENTS)})
        busy_s = time.perf_counter() - t
        wait_for(lambda: converged((7, 6)), f"loop6 = 7:6 in the VMs (round {r})", 30)
        settle()
        c3 = counters()
        assert all(vm_node(v.pid) is None for v in plain.values())  # only the VMs naming it
        assert talk({"op": "list"})["ok"]
        rounds.append({"quiet": delta(c0, c1), "busy": delta(c2, c3),
                       "busy_s": round(busy_s, 2)})
        rss.append(rss_kib(svc.pid))
        os.unlink(DEV)
        storm(5, {})
        wait_for(lambda: converged(None), "loop6 gone from the VMs", 20)
        settle()

    # a mount flapping 100 times, then every VM has exactly its hugetlbfs
    os.makedirs("/dev/hugepages", exist_ok=True)
    for k in range(100):
        sh(["mount", "-t", "hugetlbfs", "hugetlbfs", "/dev/hugepages"])
        if k < 99:
            for _ in range(100):  # the service may hold the mount point an instant
                if sh(["umount", "/dev/hugepages"], check=False).returncode == 0:
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("umount kept failing")
    wait_for(lambda: all(visible_hugetlbfs(vm.pid, i) for i, vm in plain.items()),
             "hugetlbfs in every VM after the flapping", 30)
    settle()
    rss.append(rss_kib(svc.pid))

    assert svc.poll() is None and talk({"op": "status"})["ok"]
    assert_no_traceback()
    # coalesced: a storm is a handful of batches, not one repair per event
    for rd in rounds:
        for kind in ("quiet", "busy"):
            d = rd[kind]
            assert d["uevents"] >= EVENTS or d["overflows"], (kind, d)
            assert d["batches"] <= 20, (kind, d, read_text(LOG)[-3000:])
    # KiB: what the second round and the flapping add over the first round's warm-up
    assert rss[1] - rss[0] < 4096, rss
    assert rss[2] - rss[0] < 8192, rss
    emit(ok=True, rounds=rounds,
         rss_kib={"after_round1": rss[0], "after_round2": rss[1], "after_flap": rss[2]})
