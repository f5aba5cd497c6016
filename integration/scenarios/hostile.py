"""Hostile VMs: the VM side plants symlinks, bind mounts, FIFOs, sockets, files or
directories where nsmount creates, chmods, chowns, labels or mounts something.

Each case is a function registered in :data:`CASES`; :func:`run_case` runs one inside its
own sandbox: a fake /etc first, then the case (its VM side setup, the nsmount runs and
their assertions), and prints one JSON line with ``problems`` (what changed outside the
VM's own /dev tmpfs and the mount points made on purpose, see ``support.Guard``).
integration/test_hostile.py parametrizes over the cases.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Callable

from vmhelpers import (
    PY,
    emit,
    invm,
    mount_hugetlbfs,
    mountpoints,
    nsm,
    nsm_json,
    read_text,
    sh,
    start_vm,
    write_spec,
)

from .support import SHADOW, Guard, host_byid_link, setup_fake_etc

#: name -> (case, hugetlbfs mounts the sandbox starts with)
CASES: dict[str, tuple[Callable[[], list[str]], tuple[str, ...]]] = {}


def case(hugetlbfs: tuple[str, ...] = ()) -> Callable[[Callable[[], list[str]]],
                                                       Callable[[], list[str]]]:
    """Register a case; it returns the Guard's problems."""
    def deco(fn: Callable[[], list[str]]) -> Callable[[], list[str]]:
        CASES[fn.__name__] = (fn, hugetlbfs)
        return fn
    return deco


def run_case(name: str) -> None:
    """Inside the sandbox: the fake /etc, then the case; prints its problems."""
    setup_fake_etc()
    fn, _ = CASES[name]
    emit(problems=fn())


def repairs_while_flipping(pid: int, flip: str, runs: int) -> set[int]:
    """``nsmount repair PID`` ``runs`` times while the VM loops over ``flip`` (shell);
    the exit codes seen.  No run may end in a traceback."""
    bg = subprocess.Popen(["nsenter", "-t", str(pid), "-m", "sh", "-c",
                           f"while :; do {flip}; done"], stderr=subprocess.DEVNULL)
    codes = set()
    try:
        for _ in range(runs):
            r = nsm("repair", pid)
            codes.add(r.returncode)
            assert "Traceback" not in r.stderr, r.stderr
    finally:
        bg.kill()
        bg.wait()
    return codes


# --------------------------------------------------------------------------- cases
@case()
def hugepages_symlink_to_etc_reconnect() -> list[str]:
    vm = start_vm(hugepages=False)
    invm(vm.pid, "ln -s /etc /dev/hugepages")
    g = Guard()
    mount_hugetlbfs("/dev/hugepages")
    rc, rep, _ = nsm_json("reconnect", vm.pid)
    o = rep["vms"][0]
    assert rc == 1 and o["status"] == "repaired", rep
    assert any("/dev/hugepages -> /etc" in w for w in o["warnings"]), o
    assert any(d["kind"] == "planted" and d["path"] == "/dev/hugepages" for d in o["drift"]), o
    assert mountpoints(vm.pid).count("/dev/hugepages") == 1
    assert nsm("reconnect", vm.pid).returncode == 0
    assert not os.path.exists("/etc/libvirt/qemu/3-x")
    return g.problems(allowed_mounts=["/dev/hugepages"])


@case()
def node_symlink_to_shadow() -> list[str]:
    vm = start_vm(hugepages=True)
    g = Guard()
    invm(vm.pid, "rm /dev/null; ln -s /etc/shadow /dev/null; chmod 600 /dev/zero")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 1 and o["status"] == "repaired", o
    assert any(d["kind"] == "planted" and d["path"] == "/dev/null" for d in o["drift"]), o
    assert invm(vm.pid, "stat -c %F:%t:%T /dev/null").stdout.strip() == "character special file:1:3"
    assert read_text("/etc/shadow") == SHADOW
    return g.problems()


@case()
def byid_parent_dir_symlink_repair() -> list[str]:
    host_byid_link()
    vm = start_vm(devices=["/dev/disk/by-id/usb-X"], hugepages=True)
    g = Guard()
    invm(vm.pid, "rm -rf /dev/disk; ln -s /etc /dev/disk")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 1, o
    kinds = {(d["kind"], d["path"]) for d in o["drift"]}
    assert ("planted", "/dev/disk") in kinds, o
    assert ("unsafe-path", "/dev/disk/by-id/usb-X") in kinds, o
    assert invm(vm.pid, "readlink /dev/disk/by-id/usb-X").stdout.strip() == "../../loop1"
    assert not os.path.exists("/etc/by-id")
    assert nsm("repair", vm.pid).returncode == 0
    return g.problems()


@case()
def byid_hotplug_parent_dir_symlink() -> list[str]:
    host_byid_link()
    vm = start_vm(devices=[], hugepages=True)
    g = Guard()
    invm(vm.pid, "ln -s /etc /dev/disk")
    rc, o, _ = nsm_json("device", "add", vm.pid, "/dev/disk/by-id/usb-X")
    assert rc == 1 and o["status"] == "repaired", o
    assert any(d["kind"] == "unsafe-path" for d in o["drift"]), o
    assert not os.path.exists("/etc/by-id")
    r = invm(vm.pid, "test -b /dev/loop1 && test -L /dev/disk/by-id/usb-X", check=False)
    assert r.returncode == 0
    return g.problems()


@case()
def vfio_dir_symlink_flip_race() -> list[str]:
    os.makedirs("/dev/vfio")
    os.mknod("/dev/vfio/vfio", 0o666 | stat.S_IFCHR, os.makedev(10, 196))
    os.chmod("/dev/vfio/vfio", 0o666)
    os.makedirs("/tmp/x")
    vm = start_vm(devices=["/dev/vfio/vfio"], hugepages=False)
    g = Guard("/tmp/x")
    codes = repairs_while_flipping(vm.pid, "rm -rf /dev/vfio; ln -s /tmp/x /dev/vfio; "
                                   "rm -f /dev/vfio; mkdir /dev/vfio", 50)
    assert codes <= {0, 1, 2}, codes
    assert os.listdir("/tmp/x") == []
    return g.problems()


@case()
def node_symlink_flip_race() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    codes = repairs_while_flipping(vm.pid, "chmod 600 /dev/null; rm -f /dev/null; "
                                   "ln -s /etc/shadow /dev/null; rm -f /dev/null; "
                                   "mknod -m 600 /dev/null c 1 3", 30)
    assert codes <= {0, 1, 2}, codes
    return g.problems()


@case(hugetlbfs=("/dev/hugepages",))
def hugepage_domain_dir_planted() -> list[str]:
    vm = start_vm(hugepages=True)
    g = Guard()
    # a symlink on hugetlbfs itself: refused by this kernel (EINVAL) -> plant a bind of /etc
    r = invm(vm.pid, "rmdir /dev/hugepages/libvirt/qemu/3-x && "
                     "ln -s /etc /dev/hugepages/libvirt/qemu/3-x", check=False)
    if r.returncode != 0:
        invm(vm.pid, "mkdir -p /dev/hugepages/libvirt/qemu/3-x; "
                     "mount --bind /etc /dev/hugepages/libvirt/qemu/3-x")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 2 and o["status"] == "failed", o
    assert any(d["kind"] == "missing-hugepage-dir" for d in o["drift"]), o
    assert "refusing" in o["error"] or "planted" in o["error"], o
    rc2, rep, _ = nsm_json("reconnect", vm.pid)
    assert rc2 == 2 and rep["vms"][0]["status"] == "failed", rep
    assert stat.S_IMODE(os.stat("/etc").st_mode) == 0o755
    return g.problems()


@case(hugetlbfs=("/dev/hugepages",))
def hugepage_libvirt_component_planted() -> list[str]:
    vm = start_vm(hugepages=True)
    g = Guard()
    invm(vm.pid, "rmdir /dev/hugepages/libvirt/qemu/3-x; "
                 "mount --bind /etc /dev/hugepages/libvirt/qemu")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 2 and o["status"] == "failed" and "planted" in o["error"], o
    assert not os.path.exists("/etc/3-x")
    rc2, rep, _ = nsm_json("reconnect", vm.pid)
    assert rc2 == 2 and not os.path.exists("/etc/3-x"), rep
    return g.problems()


@case()
def fifo_at_node() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    invm(vm.pid, "rm /dev/null; mkfifo /dev/null")
    rc, o, _ = nsm_json("repair", vm.pid, timeout=20)   # never opens (blocks on) the FIFO
    assert rc == 1 and any(d["kind"] == "wrong-node" for d in o["drift"]), o
    assert invm(vm.pid, "test -c /dev/null", check=False).returncode == 0
    return g.problems()


@case()
def socket_at_node() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    invm(vm.pid, "rm /dev/zero; " + PY + " -c \"import socket; "
                 "socket.socket(socket.AF_UNIX).bind('/dev/zero')\"")
    rc, o, _ = nsm_json("repair", vm.pid, timeout=20)
    assert rc == 1 and "is sock" in json.dumps(o["drift"]), o
    assert invm(vm.pid, "test -c /dev/zero", check=False).returncode == 0
    return g.problems()


@case()
def directory_at_node() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    invm(vm.pid, "rm /dev/full; mkdir /dev/full; touch /dev/full/keep")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 2 and o["status"] == "failed" and "/dev/full" in o["error"], o
    assert invm(vm.pid, "test -f /dev/full/keep", check=False).returncode == 0  # not rm -rf'd
    return g.problems()


@case()
def regular_file_at_mount_point() -> list[str]:
    vm = start_vm(hugepages=False)
    invm(vm.pid, "echo data > /dev/hugepages")
    g = Guard()
    mount_hugetlbfs("/dev/hugepages")
    rc, rep, _ = nsm_json("reconnect", vm.pid)
    o = rep["vms"][0]
    assert rc == 1 and any(d["kind"] == "planted" for d in o["drift"]), o
    assert mountpoints(vm.pid).count("/dev/hugepages") == 1
    return g.problems(allowed_mounts=["/dev/hugepages"])


@case()
def bind_of_etc_at_parent_dir() -> list[str]:
    os.makedirs("/dev/vfio")
    os.mknod("/dev/vfio/vfio", 0o666 | stat.S_IFCHR, os.makedev(10, 196))
    vm = start_vm(devices=["/dev/vfio/vfio"], hugepages=False)
    g = Guard()
    invm(vm.pid, "rm -rf /dev/vfio; mkdir /dev/vfio; mount --bind /etc /dev/vfio")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 2 and "not on the VM's own /dev tmpfs" in o["error"], o
    assert not os.path.exists("/etc/vfio")
    rc2, rep, _ = nsm_json("reconnect", vm.pid)
    assert rc2 == 2, rep
    return g.problems()


@case()
def bind_of_etc_at_mount_point() -> list[str]:
    vm = start_vm(hugepages=False)
    invm(vm.pid, "mkdir /dev/hugepages; mount --bind /etc /dev/hugepages")
    g = Guard()
    mount_hugetlbfs("/dev/hugepages")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 2 and o["status"] == "failed", o
    assert any(d["kind"] == "foreign-mount" for d in o["drift"]), o
    rc2, rep, _ = nsm_json("reconnect", vm.pid)
    o2 = rep["vms"][0]
    assert rc2 == 2 and "not a hugetlbfs" in o2["error"], rep
    assert not os.path.exists("/etc/libvirt/qemu/3-x")  # /etc/libvirt may exist (libvirt installed)
    assert mountpoints(vm.pid).count("/dev/hugepages") == 1            # not stacked
    return g.problems(allowed_mounts=["/dev/hugepages"])


@case()
def symlink_at_submount() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    invm(vm.pid, "umount /dev/shm; rmdir /dev/shm; ln -s /etc /dev/shm")
    rc, o, _ = nsm_json("repair", vm.pid)
    assert rc == 1, o
    assert any(d["kind"] == "planted" and d["path"] == "/dev/shm" for d in o["drift"]), o
    assert mountpoints(vm.pid).count("/dev/shm") == 1
    assert nsm("repair", vm.pid).returncode == 0
    return g.problems()


@case()
def symlink_at_mount_point_parent() -> list[str]:
    vm = start_vm(hugepages=False)
    invm(vm.pid, "ln -s /etc /dev/hp")
    g = Guard()
    mount_hugetlbfs("/dev/hp/2M")
    rc, rep, _ = nsm_json("reconnect", vm.pid)
    assert rc == 1, rep
    assert mountpoints(vm.pid).count("/dev/hp/2M") == 1 and not os.path.exists("/etc/2M")
    assert nsm("reconnect", vm.pid).returncode == 0
    return g.problems(allowed_mounts=["/dev/hp/2M"])


@case()
def dotdot_in_configured_paths() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    write_spec("/run/bad.toml", name="z", devices=["/dev/../etc/passwd"])
    r = nsm("exec", "--spec", "/run/bad.toml", "--", "sleep", "1")
    assert r.returncode == 4 and "contains '..'" in r.stderr and "Traceback" not in r.stderr, r
    r = nsm("repair", "--spec", "/run/bad.toml", vm.pid)
    assert r.returncode == 4 and "contains '..'" in r.stderr, r
    write_spec("/run/bad2.toml", name="z", devices=[], mounts=["/dev/hugepages/../../etc"])
    r = nsm("exec", "--spec", "/run/bad2.toml", "--", "sleep", "1")
    assert r.returncode == 4, r
    assert sorted(os.listdir("/run/nsmount/vms")) == [f"{vm.pid}.json"]
    return g.problems()


@case()
def dotdot_in_hotplug_paths() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    for verb, path in (("add", "/dev/../etc/shadow"), ("add", "/dev/net/../../etc/passwd"),
                       ("remove", "/dev/../etc/passwd"), ("add", "dev/null")):
        r = nsm("device", verb, vm.pid, path)
        assert r.returncode == 4 and "Traceback" not in r.stderr, (verb, path, r)
    return g.problems()


@case()
def hotplug_host_symlink_leaving_dev() -> list[str]:
    os.symlink("/etc/shadow", "/dev/evil")
    vm = start_vm(hugepages=False)
    g = Guard()
    r = nsm("device", "add", vm.pid, "/dev/evil")
    assert r.returncode == 4 and "outside /dev" in r.stderr, r
    assert invm(vm.pid, "test -e /dev/evil || test -L /dev/evil", check=False).returncode != 0
    return g.problems()


@case()
def newline_and_space_in_mount_points() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    weird = "/mnt/a b\nc"
    os.makedirs(weird)
    sh(["mount", "-t", "tmpfs", "tmpfs", weird])
    mount_hugetlbfs("/dev/hp a\nb")
    rc, o, _ = nsm_json("inspect", vm.pid)
    assert rc == 0 and weird in [m["target"] for m in o["mounts"]], o["mounts"]
    assert any(d["path"] == "/dev/hp a\nb" for d in o["drift"]), o["drift"]
    assert nsm("inspect", vm.pid).returncode == 0
    rc, rep, _ = nsm_json("reconnect", vm.pid)
    assert rc == 1, rep
    assert mountpoints(vm.pid).count("/dev/hp a\nb") == 1 and mountpoints(vm.pid).count(weird) == 1
    assert nsm("reconnect", vm.pid).returncode == 0 and nsm("repair", vm.pid).returncode == 0
    return g.problems(allowed_mounts=[weird, "/dev/hp a\nb"])


@case()
def huge_dev_listing() -> list[str]:
    vm = start_vm(hugepages=False)
    g = Guard()
    invm(vm.pid, "cd /dev/shm && seq 1 20000 | xargs touch; mkdir /dev/junk; "
                 "cd /dev/junk && seq 1 6000 | xargs touch")
    t = time.monotonic()
    rc, o, _ = nsm_json("inspect", vm.pid)
    assert rc == 0 and len(o["dev"]) >= 4096, len(o["dev"])
    assert nsm("repair", vm.pid).returncode == 0
    assert time.monotonic() - t < 15
    return g.problems()


@case()
def dev_not_a_tmpfs() -> list[str]:
    write_spec("/run/y.toml", name="y", id=7, devices=[])
    p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c",
                          "mount -t ramfs -o mode=755 ramfs /dev && exec sleep 1000"])
    for _ in range(200):
        if read_text(f"/proc/{p.pid}/comm").strip() == "sleep":
            break
        time.sleep(0.02)
    g = Guard()
    n_dev = mountpoints(p.pid).count("/dev")
    rc, o, _ = nsm_json("repair", "--spec", "/run/y.toml", p.pid)
    assert rc == 2 and o["drift"][0]["kind"] == "foreign-dev", o
    assert "ramfs" in o["drift"][0]["detail"] and not o["results"], o
    rc, o, _ = nsm_json("repair", "--rebuild-dev", "--spec", "/run/y.toml", p.pid)
    assert rc == 1 and o["results"][0]["action"] == "swap-dev", o
    assert nsm("repair", "--spec", "/run/y.toml", p.pid).returncode == 0
    assert mountpoints(p.pid).count("/dev") == n_dev              # swapped, not stacked
    return g.problems()


@case()
def dev_shared_with_host() -> list[str]:
    write_spec("/run/y.toml", name="y", id=7, devices=[])
    p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sleep", "1000"])
    time.sleep(0.3)
    g = Guard()
    rc, o, _ = nsm_json("repair", "--spec", "/run/y.toml", p.pid)
    assert rc == 2 and [d["kind"] for d in o["drift"]] == ["foreign-dev"], o
    assert "host namespace" in o["drift"][0]["detail"] and not o["results"], o
    return g.problems()


@case()
def lock_file_symlink() -> list[str]:
    a = start_vm("a", 1, hugepages=False)
    b = start_vm("b", 2, hugepages=False)
    st = read_text(f"/proc/{a.pid}/stat").rsplit(")", 1)[1].split()[19]
    lock = f"/run/nsmount/locks/{a.pid}-{st}.lock"
    invm(a.pid, f"mkdir -p /run/nsmount/locks && ln -s /etc/shadow {lock}")
    invm(b.pid, "rm /dev/null")
    g = Guard()
    r = nsm("repair", a.pid)
    assert r.returncode == 4 and "symbolic links" in r.stderr, r
    rc, rep, _ = nsm_json("reconnect", "--no-scan")
    by = {o["name"]: o for o in rep["vms"]}
    assert rc == 2 and by["a"]["status"] == "failed" and by["b"]["status"] == "repaired", rep
    return g.problems()


@case()
def record_tmp_symlink() -> list[str]:
    vm = start_vm(hugepages=False)
    invm(vm.pid, PY + " -c 'import os\nfor i in range(1, 5000): os.symlink(\"/etc/shadow\", "
                 f"\"/run/nsmount/vms/{vm.pid}.json.tmp.%d\" % i)'")
    g = Guard()
    r = nsm("device", "add", vm.pid, "/dev/loop2")
    assert r.returncode == 1, r
    assert not os.path.islink(f"/run/nsmount/vms/{vm.pid}.json")
    assert "/dev/loop2" in read_text(f"/run/nsmount/vms/{vm.pid}.json")
    return g.problems()


@case()
def state_dir_symlink() -> list[str]:
    vm = start_vm(hugepages=False)
    st = read_text(f"/proc/{vm.pid}/stat").rsplit(")", 1)[1].split()[19]
    invm(vm.pid, "rm -rf /run/nsmount/locks; ln -s /etc /run/nsmount/locks")
    g = Guard()
    r = nsm("repair", vm.pid)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r
    assert not os.path.exists(f"/etc/{vm.pid}-{st}.lock")
    return g.problems()
