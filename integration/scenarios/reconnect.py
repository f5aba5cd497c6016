"""Reconnect at scale and under bad input, in a sandbox playing a hypervisor host.

Stand-in VMs are ``sleep 1000`` processes launched through the library
(``start_vm(library=True)``: one fork each, no CLI start-up, so hundreds start in
seconds).  Each function asserts inside its sandbox and prints one JSON line with
``ok``; integration/test_reconnect.py runs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from vmhelpers import (
    HUGETLBFS_MAGIC,
    MB,
    check_vm,
    emit,
    mount_hugetlbfs,
    mountpoints,
    nsm,
    read_text,
    reconnect_json,
    sh,
    start_vms,
    statfs_type,
    visible_mounts,
)

HAVE_1G = os.path.exists("/sys/kernel/mm/hugepages/hugepages-1048576kB")
GB = 2 ** 30


def start_stacked_vm(i: int = 0) -> subprocess.Popen[bytes]:
    """A VM whose private /dev tmpfs sits *on top of* a slave copy of the host's /dev
    (a naive manager: unshare + mount, no detach).  Host mounts under /dev propagate
    into the hidden copy: listed in the VM's mountinfo, not reachable.  nsmount gets a
    launch record for it, as if it had started it."""
    from nsmount.model.spec import VmSpec
    from nsmount.state import record
    from nsmount.state.target import starttime

    p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c",
                          "mount -t tmpfs -o mode=755,size=64k devfs /dev && "
                          "exec sleep 1000"])
    deadline = time.time() + 10
    while read_text(f"/proc/{p.pid}/comm").strip() != "sleep":
        assert time.time() < deadline and p.poll() is None, "stacked VM did not start"
        time.sleep(0.005)
    spec = VmSpec(name=f"guest{i}", domain_id=i + 1, source="record")
    record.write(record.Record(p.pid, starttime(p.pid), spec, ()))
    return p


def scale_200() -> None:
    vms = start_vms(200)
    mounts = [("/dev/hugepages", 2 * MB), ("/mnt/huge", 2 * MB)]
    mounts.append(("/dev/hugepages1G", GB) if HAVE_1G else ("/dev/hugepages2", 2 * MB))
    for mp, ps in mounts:
        mount_hugetlbfs(mp, "1G" if ps == GB else "2M")
    host_mi = read_text("/proc/self/mountinfo")
    # before: the /dev ones are not visible in any VM
    before = [check_vm(vms[i].pid, i, mounts[:1]) for i in (0, 199)]
    assert all(p for p in before), before

    t0 = time.perf_counter()
    rc, rep, err = reconnect_json()
    t1 = time.perf_counter() - t0
    assert rc == 1, (rc, rep["summary"], err[-2000:])
    st = {o["name"]: o["status"] for o in rep["vms"]}
    assert all(st.get(f"guest{i}") == "repaired" for i in range(200)), rep["summary"]
    assert rep["summary"]["failed"] == 0, rep["summary"]
    bad = {}
    for i, vm in vms.items():
        p = check_vm(vm.pid, i, mounts)
        if p:
            bad[i] = p
    assert not bad, dict(list(bad.items())[:5])

    rc2, rep2, err2 = reconnect_json()
    assert rc2 == 0, (rc2, rep2["summary"], err2[-2000:])
    assert {o["status"] for o in rep2["vms"]} == {"ok"}, rep2["summary"]
    assert rep2["summary"]["total"] == 200, rep2["summary"]
    # stable: still exactly once each after the rerun
    bad = {i: p for i, vm in vms.items() if (p := check_vm(vm.pid, i, mounts))}
    assert not bad, dict(list(bad.items())[:5])
    # the host's mount table is as we left it
    assert read_text("/proc/self/mountinfo") == host_mi
    emit(ok=True, first=t1, seconds=rep["seconds"], seconds2=rep2["seconds"])


def bad_input() -> None:
    vms = start_vms(12)
    mount_hugetlbfs("/dev/hugepages", "2M")
    LV = "/run/libvirt/qemu"
    os.makedirs(LV, exist_ok=True)
    # a libvirt entry that lies: pid file says one process, the status XML another
    liar = subprocess.Popen(["sleep", "1000"])
    other = subprocess.Popen(["sleep", "1000"])
    with open(f"{LV}/liar.pid", "w") as fh:
        fh.write(f"{liar.pid}\n")
    with open(f"{LV}/liar.xml", "w") as fh:
        fh.write(f"<domstatus state='running' reason='booted' pid='{other.pid}'>"
                 f"<domain type='kvm' id='77'><name>liar</name></domain></domstatus>")
    # a stale pid file: the process is gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    with open(f"{LV}/stale.pid", "w") as fh:
        fh.write(f"{gone.pid}\n")
    # a VM that exits right before the run (killed and reaped)
    victim = vms[5]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    def listing() -> set[str]:
        out: set[str] = set()
        for root in ("/run/nsmount", "/run/libvirt", "/dev"):
            for dp, dns, fns in os.walk(root):
                dns[:] = [d for d in dns if d != "hugepages"]
                out.update(os.path.join(dp, n) for n in dns + fns)
        return out

    before = listing()
    mi_before = read_text("/proc/self/mountinfo")

    rc, rep, err = reconnect_json()
    assert rc == 2, (rc, rep["summary"], err[-2000:])
    by: dict[str, list[Any]] = {}
    for o in rep["vms"]:
        by.setdefault(o["name"], []).append(o)
    failed = {o["name"]: o.get("error", "") for o in rep["vms"] if o["status"] == "failed"}
    # guest5 exited: its record (and lock) are dropped, it is not a failure
    assert set(failed) == {"liar", "stale"}, rep["vms"]
    assert "guest5" not in by, by.get("guest5")
    assert not os.path.exists(f"/run/nsmount/vms/{victim.pid}.json")
    assert all(failed.values()), failed                   # every failure has a reason
    assert str(other.pid) in failed["liar"] and str(liar.pid) in failed["liar"], failed
    assert str(gone.pid) in failed["stale"] or "exit" in failed["stale"].lower() \
        or "no such" in failed["stale"].lower(), failed
    for i in range(12):
        if i == 5:
            continue
        assert [o["status"] for o in by[f"guest{i}"]] == ["repaired"], by[f"guest{i}"]
        assert check_vm(vms[i].pid, i, [("/dev/hugepages", 2 * MB)]) == []
    after = listing()
    removed = sorted(before - after)
    assert removed == [f"/run/nsmount/vms/{victim.pid}.json"] or all(
        p.startswith((f"/run/nsmount/vms/{victim.pid}.", f"/run/nsmount/locks/{victim.pid}-"))
        for p in removed), removed
    assert read_text("/proc/self/mountinfo") == mi_before
    assert liar.poll() is None and other.poll() is None
    emit(ok=True, failed=failed)


def crash_mid_run_then_rerun_converges() -> None:
    N = 60
    vms = start_vms(N)
    mounts = [("/dev/hugepages", 2 * MB)]
    mount_hugetlbfs("/dev/hugepages", "2M")
    r = nsm("reconnect", "--json", env={"NSMOUNT_CRASH_AFTER": "ReplayMount:50"}, timeout=120)
    assert r.returncode == -9, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    # some VMs were done, not all
    done = sum(1 for i, vm in vms.items() if not check_vm(vm.pid, i, mounts))
    assert 0 < done < N, done
    rc, rep, err = reconnect_json()
    assert rc == 1, (rc, rep["summary"], err[-2000:])
    assert rep["summary"]["failed"] == 0, rep["summary"]
    bad = {i: p for i, vm in vms.items() if (p := check_vm(vm.pid, i, mounts))}
    assert not bad, bad
    rc2, rep2, _ = reconnect_json()
    assert rc2 == 0, (rc2, rep2["summary"], [o for o in rep2["vms"] if o["status"] != "ok"][:3])
    emit(ok=True, done_before_crash=done, summary=rep["summary"])


def hidden_mount_is_brought_in(kind: str) -> None:
    if kind == "launched":
        pid = start_vms(1)[0].pid
    else:
        pid = start_stacked_vm().pid
    mount_hugetlbfs("/dev/hugepages", "2M")
    listed = mountpoints(pid).count("/dev/hugepages")
    p = f"/proc/{pid}/root/dev/hugepages"
    assert not os.path.exists(p) or statfs_type(p) != HUGETLBFS_MAGIC
    assert visible_mounts(pid).count("/dev/hugepages") == 0, visible_mounts(pid)
    rc, rep, err = reconnect_json(pid)
    o = rep["vms"][0]
    assert rc == 1 and o["status"] == "repaired", (rc, o, err)
    assert any(a["action"] == "replay-mount" and a["path"] == "/dev/hugepages"
               for a in o["actions"]), o["actions"]
    _p = check_vm(pid, 0, [("/dev/hugepages", 2 * MB)])
    assert _p == [], (_p, read_text(f"/proc/{pid}/mountinfo"), o["actions"])
    listed_after = mountpoints(pid).count("/dev/hugepages")
    assert listed_after == listed + 1, (listed, listed_after)
    rc2, rep2, _ = reconnect_json(pid)
    assert rc2 == 0 and rep2["vms"][0]["status"] == "ok", rep2
    _p = check_vm(pid, 0, [("/dev/hugepages", 2 * MB)])
    assert _p == [], (_p, read_text(f"/proc/{pid}/mountinfo"), o["actions"])
    assert mountpoints(pid).count("/dev/hugepages") == listed_after
    # the checker itself sees stacking
    sh(["nsenter", "-t", str(pid), "-m", "mount", "--bind", "/dev/hugepages", "/dev/hugepages"])
    assert check_vm(pid, 0, [("/dev/hugepages", 2 * MB)]) == ["/dev/hugepages: 2 visible mounts"]
    emit(ok=True, listed_before=listed)
