"""Rootless launches (issue 12, item 1): a real unprivileged user runs ``nsmount exec``.

The user is :data:`vmhelpers.NOBODY` (uid/gid 65534, no user added to /etc); nsmount runs
under the system Python with ``PYTHONPATH`` at the repository and its state in the
user's runtime dir (``start_vm(user=...)``, ``nsm(..., user=...)``, see
:func:`vmhelpers.user_python`).  Each function runs inside its own sandbox and prints one
JSON line of observations; integration/test_rootless.py asserts on it.  Run as a module
(``python -m scenarios.rootless``, by the user), it is the user's own Python code calling
``nsmount.launch()`` (:func:`user_library_launch`).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from typing import Any

from vmhelpers import (
    NOBODY,
    comm,
    dev_tree,
    emit,
    loop_device,
    mntns,
    mountinfo_lines,
    nsm,
    python_m,
    qmp,
    read_text,
    record_path,
    start_vm,
    stop,
    user_state_dir,
    write_spec,
)

from .crash import planned

STATE = user_state_dir(NOBODY)


def host_snapshot() -> tuple[list[str], dict[str, tuple[Any, ...]]]:
    """The sandbox host's mount table (mount ids left out) and its /dev."""
    return sorted(ln.split(" ", 1)[1] for ln in mountinfo_lines()), dev_tree("/dev")


def other_userns(pid: int) -> bool:
    return os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino


def mounts_by_point(pid: int) -> dict[str, str]:
    """mount point -> the (last) mountinfo line there, as the VM sees it."""
    return {ln.split()[4]: ln for ln in mountinfo_lines(pid)}


def stand_in() -> None:
    os.chmod("/dev/loop0", 0o666)   # the sandbox host's copy: the user may use it
    os.chmod("/dev/loop1", 0o600)   # ...but not this one
    os.chmod("/dev/hugepages", 0o1777)
    os.makedirs("/dev/disk/by-id", exist_ok=True)
    os.symlink("../../loop0", "/dev/disk/by-id/usb-X")
    spec = write_spec("/tmp/vm.toml", name="r", id=4, hugepages=True, devices=[
        "/dev/disk/by-id/usb-X", {"path": "/dev/loop1", "optional": True}])
    before = host_snapshot()

    r = nsm("exec", "--dry-run", "--spec", spec, "--", "sh", user=NOBODY)
    assert r.returncode == 0, r
    assert "rootless" in r.stdout and "bind host node /dev/loop0" in r.stdout, r.stdout
    assert "skip /dev/kvm: no read-write access for uid 65534" in r.stdout, r.stdout
    assert "skip /dev/loop1: no read-write access" in r.stdout, r.stdout
    assert host_snapshot() == before
    r = nsm("exec", "--dry-run", "--json", "--spec", spec, "--", "sh", user=NOBODY)
    doc = json.loads(r.stdout)
    assert doc["rootless"] is True and doc["actions"][-1]["action"] == "seal-namespace"

    script = ("cat /proc/self/uid_map; echo ---; "
              "umount -l /dev 2>/dev/null && echo UMOUNTED || echo SEALED; echo ---; "
              "echo hi > /dev/null && echo NULL-OK; "
              "head -c 4 /dev/zero | od -An -tx1; echo ---")
    p = start_vm(spec=spec, script=script, user=NOBODY, stdout=subprocess.PIPE, timeout=60)
    pid = p.pid
    assert mntns(pid) != mntns()
    assert other_userns(pid)
    assert p.stdout is not None
    got = [p.stdout.readline().strip() for _ in range(7)]  # up to the last ---
    vm_dev = dev_tree(f"/proc/{pid}/root/dev")
    mi = mounts_by_point(pid)
    hp_st = os.stat("/dev/hugepages/libvirt/qemu/4-r")
    rec = json.loads(read_text(record_path(pid, STATE)))
    stop(p)
    emit(uid_map=got[0], lines=got, dev=sorted(vm_dev), nodes={
             k: list(v) for k, v in vm_dev.items() if v[0] in "cbl"},
         devmount=mi["/dev"], ptsmount=mi["/dev/pts"], hpmount=mi.get("/dev/hugepages"),
         hp=[oct(stat.S_IMODE(hp_st.st_mode)), hp_st.st_uid, hp_st.st_gid],
         rec_userns=rec.get("userns"), rec_pid=rec["pid"], pid=pid,
         unchanged=host_snapshot() == before, loop0=os.stat("/dev/loop0").st_rdev)


def errors() -> None:
    os.chmod("/dev/loop1", 0o600)
    write_spec("/tmp/req.toml", name="r", devices=["/dev/loop1"])
    before = host_snapshot()
    r1 = nsm("exec", "--spec", "/tmp/req.toml", "--", "true", user=NOBODY)
    # no runtime dir for the record: a clear error, nothing left behind
    r2 = nsm("exec", "--", "true", env={"XDG_RUNTIME_DIR": "/nonexistent"}, user=NOBODY)
    r3 = nsm("exec", "--domain-xml", "/dev/null", "--", "true", user=NOBODY)
    emit(r=[[r.returncode, r.stderr] for r in (r1, r2, r3)],
         unchanged=host_snapshot() == before)


def qemu() -> None:
    """A real QEMU launched rootless; root's QMP client adds the bound loop device."""
    with loop_device("/tmp/disk.img") as loop:
        vm = None
        try:
            os.chmod(loop, 0o666)  # the sandbox host's node: this user may use it
            spec = write_spec("/tmp/vm.toml", name="q", id=9, devices=[loop])
            before = host_snapshot()
            vm = start_vm(spec=spec, qemu=(), user=NOBODY, timeout=90)
            pid = vm.pid
            with qmp(vm, timeout=60) as q:
                status = q.cmd("query-status")["status"]
                q.cmd("blockdev-add", {"driver": "host_device", "node-name": "d1",
                                       "filename": loop})
                nodes = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
            ids = {"mnt": mntns(pid) != mntns(), "user": other_userns(pid),
                   "uid": next(ln.split()[1] for ln in read_text(f"/proc/{pid}/status")
                               .splitlines() if ln.startswith("Uid:"))}
            vm_dev = sorted(dev_tree(f"/proc/{pid}/root/dev"))
            devmount = [ln for ln in mountinfo_lines(pid) if ln.split()[4] == "/dev"]
            comm_ = comm(pid)
        finally:
            if vm is not None:
                stop(vm)
    emit(status=status, nodes=nodes, ids=ids, dev=vm_dev, devmount=devmount[-1],
         comm=comm_, loop=loop, unchanged=host_snapshot() == before)


def crash_and_relaunch(steps: list[str], only_plan: bool = False) -> None:
    """For each step the rootless launch plans: ``NSMOUNT_CRASH_AFTER=<step>`` (must die of
    SIGKILL), nothing left on the host (mountinfo, /dev, no record), the next launch
    works.  Emits the planned steps and, per step, what was wrong."""
    from nsmount.engine.actions import kebab

    by_kind = {kebab(s): s for s in steps}  # JSON names the actions in kebab-case
    os.chmod("/dev/loop0", 0o666)
    os.chmod("/dev/hugepages", 0o1777)
    os.makedirs("/dev/net", exist_ok=True)
    spec = write_spec("/tmp/vm.toml", name="c", hugepages=True, devices=["/dev/loop0"])
    plan = planned(["exec", "--spec", spec, "--", "true"], by_kind, user=NOBODY)
    runs: dict[str, list[str]] = {}
    vms = f"{STATE}/vms"
    if not only_plan:
        before = host_snapshot()
        for step in dict.fromkeys(plan):
            errs = []
            r = nsm("exec", "--spec", spec, "--", "true", env={"NSMOUNT_CRASH_AFTER": step},
                    timeout=20, user=NOBODY)
            if r.returncode != -9:
                errs.append(f"exit {r.returncode}, not -9: {r.stderr[-300:]}")
            if os.path.isdir(vms) and os.listdir(vms):
                errs.append(f"record left: {os.listdir(vms)}")
            now = host_snapshot()
            # per-domain hugepage dirs (the pid names them) are made on the host's
            # hugetlbfs on purpose; everything else must be as before
            lines = now[0] == before[0]
            dev = {k: v for k, v in now[1].items() if not k.startswith("/dev/hugepages/")}
            if not lines or dev != before[1]:
                errs.append("sandbox host changed")
            r = nsm("exec", "--spec", spec, "--", "sh", "-c", "test -b /dev/loop0",
                    user=NOBODY)
            if r.returncode != 0:
                errs.append(f"relaunch failed {r.returncode}: {r.stderr[-300:]}")
            for f in os.listdir(vms) if os.path.isdir(vms) else ():
                os.unlink(f"{vms}/{f}")
            runs[step] = errs
    emit(planned=sorted(set(plan)), runs=runs)


def library_launch() -> None:
    """``nsmount.launch()`` by the unprivileged user from its own Python code."""
    r = python_m("scenarios.rootless", user=NOBODY, timeout=60)
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    doc["record"] = os.path.exists(record_path(doc["pid"], STATE))
    emit(**doc)


def user_library_launch() -> None:
    """The user's own code (run by :func:`library_launch` as the user): the API under
    test, ``nsmount.launch()``, of a stand-in that checks its /dev and exits; prints its
    exit code, whether the plan was rootless, and its pid."""
    import nsmount

    vm = nsmount.launch(nsmount.VmSpec(name="lib", domain_id=6),
                        ["sh", "-c", "test -L /dev/ptmx && test -c /dev/null && ls /dev/pts"])
    rc = vm.wait()
    vm.close()
    print(json.dumps({"rc": rc, "rootless": vm.plan.rootless, "pid": vm.pid}))


if __name__ == "__main__":  # the user's own Python (library_launch)
    user_library_launch()
