"""Face 2 end to end: inspect, repair, hotplug, run-in and propagation on running VMs.

Each function runs inside its own sandbox (the fake hypervisor host), asserts there
and prints ``OK``; integration/test_repair.py runs them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import subprocess
from typing import Any

from nsmount.state.target import starttime
from vmhelpers import (
    PY,
    comm,
    kinds,
    loop_device,
    mountinfo_lines,
    nsm,
    nsm_json,
    one_line_error,
    qmp,
    read_text,
    sh,
    start_vm,
    stop,
    top_mounts,
    vm_lstat,
    wait_for,
    write_spec,
)

from .support import tree_snapshot


def vm_state(pid: int) -> tuple[str, dict[str, Any]]:
    """The VM's mount table and /dev listing, seen through /proc/PID/root."""
    return read_text(f"/proc/{pid}/mountinfo"), tree_snapshot(f"/proc/{pid}/root/dev")


DAMAGE = "rm /dev/null; chmod 600 /dev/zero; umount /dev/shm; mount --make-private /"


def check_damage_cycle(pid: int, source: str = "record") -> None:
    """The issue's cycle: inspect reports, dry-run changes nothing, repair fixes (1),
    the next repair is clean (0)."""
    sh(["nsenter", "-t", str(pid), "-m", "sh", "-c", DAMAGE])
    _, doc, _ = nsm_json("inspect", pid, rc=0)
    assert doc["source"] == source, doc["source"]
    for d in doc["drift"]:
        assert set(d) == {"kind", "path", "detail", "fixable"} and d["detail"], d
    assert {("missing-node", "/dev/null"), ("wrong-attrs", "/dev/zero"),
            ("missing-mount", "/dev/shm"), ("private-mount", "/")} <= kinds(doc), doc["drift"]
    zero = next(d for d in doc["drift"] if d["path"] == "/dev/zero")
    assert "0600" in zero["detail"] and "0666" in zero["detail"], zero
    assert not any(e["path"] == "/dev/null" for e in doc["dev"])

    before = vm_state(pid)
    _, doc, _ = nsm_json("repair", pid, "--dry-run", rc=1)  # would repair: 1, like repair
    assert doc["status"] == "would-repair" and doc["results"] == [], doc
    assert len(doc["actions"]) >= 4, doc["actions"]
    assert vm_state(pid) == before, "repair --dry-run changed the VM"

    _, doc, _ = nsm_json("repair", pid, rc=1)
    assert doc["status"] == "repaired", doc
    assert doc["results"] and all(r["ok"] for r in doc["results"]), doc["results"]
    st = vm_lstat(pid, "/dev/null")
    assert st and stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3), st
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = vm_lstat(pid, "/dev/zero")
    assert st and stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666, st
    m = top_mounts(pid)
    assert m["/dev/shm"].fstype == "tmpfs", m
    assert m["/"].is_slave, m["/"]
    # /dev/shm is the host's: a file made on the sandbox side shows up in the VM
    with open("/dev/shm/probe", "w") as fh:
        fh.write("hi")
    assert vm_lstat(pid, "/dev/shm/probe") is not None
    os.unlink("/dev/shm/probe")
    # and / propagates again: a mount made on the sandbox side arrives in the VM
    os.makedirs("/mnt/late", exist_ok=True)
    sh(["mount", "-t", "tmpfs", "late", "/mnt/late"])
    try:
        assert "/mnt/late" in top_mounts(pid), "host mounts do not reach the VM"
    finally:
        sh(["umount", "/mnt/late"])

    _, doc, _ = nsm_json("repair", pid, rc=0)
    assert doc["status"] == "ok" and doc["actions"] == [] and doc["drift"] == [], doc


def damage_cycle() -> None:
    vm = start_vm(hugepages=True)
    try:
        _, doc, _ = nsm_json("repair", vm.pid, rc=0)
        assert doc["status"] == "ok", doc
        check_damage_cycle(vm.pid)
    finally:
        stop(vm)
    print("OK")


def qemu_damage_cycle() -> None:
    vm = start_vm("q", 5, qemu=(), devices=[])
    try:
        with qmp(vm) as q:
            assert q.cmd("query-status")["status"] == "prelaunch"
            check_damage_cycle(vm.pid)
            assert q.cmd("query-status")["status"] == "prelaunch"
        # a new connection after the repair answers too
        with qmp(vm) as q:
            assert q.cmd("query-status")["status"] == "prelaunch"
        assert vm.poll() is None
    finally:
        stop(vm)
    print("OK")


def qemu_hotplug_loop_device() -> None:
    with loop_device("/tmp/disk.img") as loop:
        vm = None
        try:
            host_st = os.lstat(loop)
            vm = start_vm("q", 5, qemu=(), devices=[])
            pid = vm.pid
            blk = {"driver": "host_device", "node-name": "d1", "filename": loop}
            with qmp(vm) as q:
                assert vm_lstat(pid, loop) is None
                reply = q.execute("blockdev-add", blk)
                assert "error" in reply and "No such file" in reply["error"]["desc"], reply

                r = nsm("device", "add", pid, loop)
                assert r.returncode == 1, r  # repaired (added)
                st = vm_lstat(pid, loop)
                assert st and stat.S_ISBLK(st.st_mode) and st.st_rdev == host_st.st_rdev, st
                q.cmd("blockdev-add", blk)
                assert any(n["node-name"] == "d1" for n in q.cmd("query-named-block-nodes"))
                rec = json.loads(read_text(f"/run/nsmount/vms/{pid}.json"))
                assert loop in json.dumps(rec), rec

                # the record is updated: repair recreates the hotplugged node
                _, doc, _ = nsm_json("repair", pid, rc=0)
                assert doc["actions"] == [], doc
                sh(["nsenter", "-t", str(pid), "-m", "rm", loop])
                _, doc, _ = nsm_json("repair", pid, rc=1)
                assert ("missing-node", loop) in kinds(doc), doc
                assert vm_lstat(pid, loop) is not None

                q.cmd("blockdev-del", {"node-name": "d1"})
                r = nsm("device", "remove", pid, loop)
                assert r.returncode == 1, r  # removed
                r = nsm("device", "remove", pid, loop, "--json")
                assert r.returncode == 0 and json.loads(r.stdout)["status"] == "ok", r
                assert vm_lstat(pid, loop) is None, "still in the VM"
                assert os.lstat(loop).st_ino == host_st.st_ino, "host node touched"
                _, doc, _ = nsm_json("repair", pid, rc=0)
                assert doc["actions"] == [], doc
                assert vm_lstat(pid, loop) is None, "repair recreated a removed node"
                reply = q.execute("blockdev-add", blk)
                assert "error" in reply, reply

                # a default node cannot be removed
                before = vm_state(pid)
                r = nsm("device", "remove", pid, "/dev/null")
                one_line_error(r, 4, "default")
                assert vm_state(pid) == before
                assert q.cmd("query-status")["status"] == "prelaunch"
        finally:
            if vm is not None:
                stop(vm)
    print("OK")


def bad_targets() -> None:
    vm = start_vm(hugepages=True)
    pid = vm.pid
    others: list[subprocess.Popen[Any]] = []
    try:
        vm_before = vm_state(pid)
        dev_before = tree_snapshot("/dev")

        # the host itself: our own pid and PID 1 of the sandbox
        for t in (os.getpid(), 1, f"pid:{os.getpid()}"):
            for args in (("repair", t), ("inspect", t), ("device", "add", t, "/dev/loop1")):
                one_line_error(nsm(*args), 10, "refusing")
        # nonexistent pid
        one_line_error(nsm("repair", 99999), 9)
        one_line_error(nsm("inspect", "pid:99999"), 9)

        # a pid that exits during the run: it waits for the VM lock, the VM dies
        victim = start_vm("v", 4, hugepages=True)
        others.append(victim)
        nsm_json("inspect", victim.pid, rc=0)  # makes the locks dir
        lock = f"/run/nsmount/locks/{victim.pid}-{starttime(victim.pid)}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        rep = subprocess.Popen([PY, "-m", "nsmount", "repair", str(victim.pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        def holds_lock() -> bool:
            # the lock is taken by the repair's forked worker (or the repair itself)
            pids = [rep.pid] + [int(p) for p in os.listdir("/proc")
                                if p.isdigit() and _ppid(int(p)) == rep.pid]
            for pid in pids:
                try:  # the fd may close between listdir and readlink
                    for f in os.listdir(f"/proc/{pid}/fd"):
                        if os.readlink(f"/proc/{pid}/fd/{f}") == lock:
                            return True
                except FileNotFoundError:
                    pass
            return False

        wait_for(holds_lock, "repair to open the lock")
        stop(victim)
        os.close(fd)
        out, err = rep.communicate(timeout=30)
        one_line_error(subprocess.CompletedProcess(rep.args, rep.returncode, out, err), 9,
                       str(victim.pid))

        # not QEMU, no record: 11 mentioning --spec; with --spec it works
        plain = subprocess.Popen(["unshare", "-m", "--propagation", "slave",
                                  "sleep", "100"])
        others.append(plain)
        wait_for(lambda: comm(plain.pid) == "sleep", "unshare")
        plain_before = vm_state(plain.pid)
        one_line_error(nsm("inspect", plain.pid), 11, "--spec")
        one_line_error(nsm("repair", plain.pid), 11, "--spec")
        _, doc, _ = nsm_json("inspect", plain.pid, "--spec", "/run/spec-x.toml", rc=0)
        assert doc["source"] == "spec", doc
        assert [d["kind"] for d in doc["drift"]] == ["foreign-dev"], doc["drift"]
        # its /dev is the sandbox host's own: nsmount writes nothing there, fails
        _, doc, _ = nsm_json("repair", plain.pid, "--spec", "/run/spec-x.toml", rc=2)
        assert [d["kind"] for d in doc["drift"]] == ["foreign-dev"], doc["drift"]
        assert "host namespace" in doc["drift"][0]["detail"], doc["drift"]
        assert vm_state(plain.pid) == plain_before

        # libvirt domain names
        os.makedirs("/run/libvirt/qemu", exist_ok=True)
        one_line_error(nsm("repair", "nosuchdom"), 8, "nosuchdom.pid")
        with open("/run/libvirt/qemu/bad.pid", "w") as fh:
            fh.write(f"{plain.pid}\n")
        with open("/run/libvirt/qemu/bad.xml", "w") as fh:
            fh.write(f"<domstatus state='running' pid='{plain.pid}'><domain type='kvm'><name>bad")
        one_line_error(nsm("repair", "bad"), 3, "bad.xml")
        one_line_error(nsm("inspect", "bad"), 3)

        # hotplug paths: not a device (5), '..' (4), outside /dev (4)
        one_line_error(nsm("device", "add", pid, "/dev/shm"), 5)
        one_line_error(nsm("device", "add", pid, "/dev/../etc/passwd"), 4)
        one_line_error(nsm("device", "add", pid, "/dev/loop1/../loop2"), 4)
        one_line_error(nsm("device", "remove", pid, "/dev/../dev/loop0"), 4)
        one_line_error(nsm("device", "add", pid, "/etc/passwd"), 4)

        assert vm_state(pid) == vm_before, "the VM changed"
        assert tree_snapshot("/dev") == dev_before, "the sandbox /dev changed"
        _, doc, _ = nsm_json("repair", pid, rc=0)
    finally:
        for p in [vm, *others]:
            stop(p)
    print("OK")


def vm_etc_mounts(pid: int) -> list[str]:
    return [ln for ln in mountinfo_lines(pid) if " /etc " in ln]


def planted_symlinks() -> None:
    # a private copy of /etc bound over the sandbox's, so a followed symlink could
    # only damage the copy
    sh(["cp", "-a", "/etc", "/run/fake-etc"])
    sh(["mount", "--bind", "/run/fake-etc", "/etc"])

    def etc_state():
        st = os.stat("/etc/passwd")
        with open("/etc/passwd", "rb") as fh:
            data = fh.read()
        return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, hashlib.sha1(data).digest(),
                os.stat("/etc").st_mode, sorted(os.listdir("/etc")))

    vm = start_vm(hugepages=True)
    pid = vm.pid
    try:
        etc = etc_state()
        sandbox_mi = read_text("/proc/self/mountinfo")
        vm_etc = vm_etc_mounts(pid)
        sh(["nsenter", "-t", str(pid), "-m", "sh", "-c",
            "umount /dev/shm && rmdir /dev/shm && ln -s /etc /dev/shm && "
            "rm /dev/zero && ln -s /etc/passwd /dev/zero"])
        _, doc, _ = nsm_json("inspect", pid, rc=0)
        warn = " ".join(doc["warnings"])
        assert "/dev/shm -> /etc" in warn and "/dev/zero -> /etc/passwd" in warn, warn
        assert ("planted", "/dev/zero") in kinds(doc), doc["drift"]
        assert ("planted", "/dev/shm") in kinds(doc), doc["drift"]

        _, doc, _ = nsm_json("repair", pid, rc=1)
        assert all(r["ok"] for r in doc["results"]), doc["results"]
        assert ("planted", "/dev/zero") in kinds(doc), doc["drift"]
        assert etc_state() == etc, "the sandbox's /etc/passwd changed"
        assert read_text("/proc/self/mountinfo") == sandbox_mi, "sandbox mounts changed"
        st = vm_lstat(pid, "/dev/zero")
        assert st and stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 5), st
        assert stat.S_IMODE(st.st_mode) == 0o666
        st = vm_lstat(pid, "/dev/shm")
        assert st and stat.S_ISDIR(st.st_mode), st
        m = top_mounts(pid)
        assert m["/dev/shm"].fstype == "tmpfs", m
        assert vm_etc_mounts(pid) == vm_etc, "something was mounted over the VM's /etc"
        _, doc, _ = nsm_json("repair", pid, rc=0)
        assert etc_state() == etc
    finally:
        stop(vm)
    print("OK")


def rebuild_dev_keeps_open_fds() -> None:
    spec = write_spec("/run/spec-r.toml", name="r", id=6, devices=[], hugepages=False)
    loop = ("exec 3</dev/null; i=0; while :; do i=$((i+1)); "
            "if cat <&3 >/dev/null; then echo ok $i; else echo bad $i; fi "
            ">>/tmp/reads; sleep 0.05; done")
    p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c", loop])
    pid = p.pid
    try:
        wait_for(lambda: os.path.exists("/tmp/reads"), "reader")
        assert os.readlink(f"/proc/{pid}/fd/3") == "/dev/null"
        assert vm_lstat(pid, "/dev/loop0") is not None  # the sandbox's full /dev
        r = nsm("repair", pid)
        one_line_error(r, 11, "--spec")
        _, doc, _ = nsm_json("repair", pid, "--rebuild-dev", "--spec", spec, rc=1)
        assert doc["status"] == "repaired", doc
        assert all(r["ok"] for r in doc["results"]), doc["results"]

        m = top_mounts(pid)
        assert m["/dev"].fstype == "tmpfs", m
        assert m["/dev/pts"].fstype == "devpts" and m["/dev/shm"].fstype == "tmpfs", m
        names = set(os.listdir(f"/proc/{pid}/root/dev"))
        defaults = {"null", "full", "zero", "random", "urandom", "ptmx", "kvm"}
        assert defaults <= names, names
        assert "loop0" not in names and "loop-control" not in names, names
        assert os.stat(f"/proc/{pid}/root/dev").st_dev != os.stat("/dev").st_dev
        # the sandbox's own /dev is untouched
        assert os.path.exists("/dev/loop0") and os.path.ismount("/dev/shm")

        # the reader keeps going on its old fd 3 (and the new /dev/null)
        assert os.path.exists(f"/proc/{pid}/fdinfo/3")
        n0 = len(read_text("/tmp/reads").splitlines())
        wait_for(lambda: len(read_text("/tmp/reads").splitlines()) >= n0 + 5,
                 "reads after the swap", timeout=10)
        lines = read_text("/tmp/reads").splitlines()
        assert all(ln.startswith("ok ") for ln in lines), [ln for ln in lines if "bad" in ln]
        assert p.poll() is None
        _, doc, _ = nsm_json("repair", pid, "--spec", spec, rc=0)
        assert doc["actions"] == [], doc
    finally:
        stop(p)
    print("OK")


def run_in() -> None:
    vm = start_vm(hugepages=True)
    try:
        r = nsm("run-in", vm.pid, "--", "cat", "/proc/self/mountinfo")
        assert r.returncode == 0, r
        assert r.stdout == read_text(f"/proc/{vm.pid}/mountinfo")
        assert r.stdout != read_text("/proc/self/mountinfo")
        dev = [ln for ln in r.stdout.splitlines() if ln.split(" ")[4] == "/dev"]
        assert len(dev) == 1 and "devfs" in dev[0], dev  # the VM's private tmpfs
        r = nsm("run-in", vm.pid, "--", "ls", "/dev")
        assert "loop0" in r.stdout.split() and "loop1" not in r.stdout.split(), r.stdout
        for t in (os.getpid(), 1):
            one_line_error(nsm("run-in", t, "--", "true"), 10, "refusing")
        one_line_error(nsm("run-in", vm.pid, "--", "no-such-cmd-xyz"), 7)
    finally:
        stop(vm)
    print("OK")


def propagation() -> None:
    def prop(path: str) -> str:
        last = None
        for line in read_text("/proc/self/mountinfo").splitlines():
            f = line.split(" - ")[0].split(" ")
            if f[4] == path:
                last = " ".join(f[6:])
        assert last is not None, f"{path} is not a mount point"
        return last

    r = nsm("propagation", "--check")
    assert r.returncode == 0, r
    r = nsm("propagation", "--check", "--json")
    doc = json.loads(r.stdout)
    assert doc["ok"] and {m["path"] for m in doc["mounts"]} >= {"/", "/dev"}, doc

    sh(["mount", "--make-private", "/dev"])
    assert "shared:" not in prop("/dev")
    r = nsm("propagation", "--check")
    assert r.returncode == 1 and "BAD" in r.stdout and "/dev" in r.stdout, r
    mi = read_text("/proc/self/mountinfo")
    r = nsm("propagation", "--fix", "--dry-run")
    assert r.returncode == 1 and "would run" in r.stdout, r
    assert read_text("/proc/self/mountinfo") == mi, "--dry-run changed mounts"
    r = nsm("propagation", "--fix")
    assert r.returncode == 0, r
    assert "shared:" in prop("/dev"), prop("/dev")
    assert nsm("propagation", "--check").returncode == 0
    # a path that is no mount point fails, and the JSON agrees with its rows
    for path in ("/nonexistent", "/etc"):
        r = nsm("propagation", "--check", "--json", path)
        doc = json.loads(r.stdout)
        assert r.returncode == 1 and doc["ok"] is False, r
        assert doc["mounts"][0]["mounted"] is False and doc["version"] == 1, doc
    r = nsm("propagation", "--check", "/", "/etc")
    assert r.returncode == 1 and "not a mount point" in r.stdout, r
    print("OK")


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
