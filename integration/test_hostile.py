"""Hostile VMs: the VM side plants symlinks, bind mounts, FIFOs, sockets, files or
directories where nsmount creates, chmods, chowns, labels or mounts something.

Every case runs in its own sandbox (tests/sandbox.py) with its own stand-in VM(s)
(``nsmount exec --spec F -- sleep 1000``).  Before anything else the sandbox host gets
a *fake* /etc: a copy of /etc with a fake ``shadow``, bind-mounted over /etc, so a
symlink to /etc/shadow that nsmount wrongly followed would only damage the copy, and
the test would see it.  Each case asserts that nothing changed outside the VM's own
/dev tmpfs / intended mount point: the (fake) /etc tree and the sandbox host's /dev
(inode, type, mode, owner, rdev, content or link target of every entry), any extra
watched tree, and the sandbox host's mountinfo except the mounts the case made on
purpose; that the case is reported (warning / drift / failed action with a reason);
and that the exit code is a documented one (0 clean, 1 repaired, 2 failed, 4 unsafe
path; see nsmount/errors.py).

=====================================  =============================================  =====
case                                   outcome                                        exit
=====================================  =============================================  =====
hugepages_symlink_to_etc_reconnect     /dev/hugepages -> /etc in the VM, hugetlbfs    1
                                       mounted on the host later: warning "points
                                       outside /dev", planted symlink removed, mount
                                       point made on the VM's tmpfs, hugetlbfs
                                       replayed once; rerun 0
node_symlink_to_shadow                 /dev/null -> /etc/shadow: drift "planted",     1
                                       node replaced atomically (rename over the
                                       link); fake shadow untouched
byid_parent_dir_symlink_repair         /dev/disk -> /etc (by-id device): drifts       1
                                       planted + unsafe-path, dir rebuilt, link
                                       recreated; rerun 0
byid_hotplug_parent_dir_symlink        same, via ``device add``: repaired, nothing    0
                                       created in /etc
vfio_dir_symlink_flip_race             /dev/vfio flipped dir <-> symlink to /tmp/x    0/1/2
                                       while repair runs 50x: each run ok, repaired
                                       or failed (ENOENT/ELOOP reason); /tmp/x empty
node_symlink_flip_race                 /dev/null flipped node <-> symlink to shadow   0/1/2
                                       (30 repairs): shadow never chmodded/chowned
hugepage_domain_dir_planted            <hugetlbfs>/libvirt/qemu/3-x planted (symlink  2
                                       refused by the kernel on hugetlbfs -> a bind
                                       mount of /etc): drift missing-hugepage-dir,
                                       action refused "not a directory on the
                                       hugetlbfs"; repair and reconnect fail [fixed]
hugepage_libvirt_component_planted     bind of /etc at <hugetlbfs>/libvirt/qemu:      2
                                       mkdir refused (EXDEV "planted"), /etc/3-x
                                       NOT created  [fixed: was created, 0700]
fifo_at_node                           FIFO at /dev/null: wrong-node, replaced,       1
                                       never opened (no hang)
socket_at_node                         socket at /dev/zero: wrong-node, replaced      1
directory_at_node                      directory at /dev/full: replace fails "Is a    2
                                       directory"; directory content kept
regular_file_at_mount_point            file at /dev/hugepages: "removed planted       1
                                       file", hugetlbfs replayed once
bind_of_etc_at_parent_dir              bind of /etc at /dev/vfio, node below needed:  2
                                       refused "not on the VM's own /dev tmpfs"
bind_of_etc_at_mount_point             bind of /etc at /dev/hugepages: repair shows   2
                                       drift foreign-mount (no stacking, exit 2);
                                       reconnect fails "not a hugetlbfs" (exit 2)
symlink_at_submount                    /dev/shm -> /etc: planted, replaced by a dir,  1
                                       host /dev/shm replayed once; rerun 0
symlink_at_mount_point_parent          /dev/hp -> /etc; hugetlbfs at /dev/hp/2M:      1
                                       parent rebuilt on the VM tmpfs, mount
                                       replayed; rerun 0
dotdot_in_configured_paths             spec devices=["/dev/../etc/passwd"] (exec,     4
                                       repair --spec), mounts with '..': refused
                                       before any change  [fixed: exit was 3]
dotdot_in_hotplug_paths                device add/remove with '..' or relative path   4
hotplug_host_symlink_leaving_dev       host /dev/evil -> /etc/shadow, device add:     4
                                       "resolves to /etc/shadow, outside /dev"
newline_and_space_in_mount_points      tmpfs at "/mnt/a b\\nc", hugetlbfs at           1
                                       "/dev/hp a\\nb": inspect --json shows them
                                       exactly, reconnect replays, rerun 0
huge_dev_listing                       20000 files in /dev/shm, 6000 in /dev/junk:    0
                                       inspect/repair fast, shm not walked
dev_not_a_tmpfs                        VM /dev is a ramfs: drift foreign-dev, nothing 2
                                       written; --rebuild-dev swaps in a tmpfs
                                       (MOVE_MOUNT_BENEATH, not stacked); rerun 0
dev_shared_with_host                   VM /dev is the host's /dev superblock:         2
                                       drift foreign-dev, nothing written  [fixed:
                                       would have written the host /dev]
lock_file_symlink                      lock file -> /etc/shadow: repair refuses       4/2
                                       (ELOOP, exit 4); reconnect fails that VM,
                                       repairs the other  [fixed: whole reconnect
                                       aborted]
record_tmp_symlink                     <pid>.json.tmp.N -> /etc/shadow planted for    0
                                       every N: record written with O_EXCL|
                                       O_NOFOLLOW  [fixed: shadow overwritten]
state_dir_symlink                      /run/nsmount/locks -> /etc: refused (ELOOP),   4
                                       no lock file in /etc  [fixed]
=====================================  =============================================  =====
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import privileged, run_in_sandbox

pytestmark = privileged

#: helpers that run inside every sandbox (fake /etc, snapshots, VM start, nsmount calls)
PRELUDE = r'''
import hashlib, json, os, signal, stat, subprocess, sys, time

PY = sys.executable
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0], "integration"))
from vmhelpers import nsm, write_spec

FAKE_ETC = "/run/fake-etc"
SHADOW = "root:$6$FAKE$sandbox-only:19000:0:99999:7:::\n"


def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=check, capture_output=True,
                          text=True, **kw)


def setup_fake_etc():
    """A sandbox-local copy of /etc bind-mounted over /etc, so a symlink to /etc/shadow
    that nsmount wrongly followed could only damage the copy (and the test sees it)."""
    sh(["cp", "-a", "/etc", FAKE_ETC])
    with open(FAKE_ETC + "/shadow", "w") as fh:
        fh.write(SHADOW)
    os.chmod(FAKE_ETC + "/shadow", 0o640)
    os.chown(FAKE_ETC + "/shadow", 0, 42)
    with open(FAKE_ETC + "/.nsmount-fake-etc", "w") as fh:
        fh.write("sandbox\n")
    sh(["mount", "--bind", FAKE_ETC, "/etc"])
    assert os.path.exists("/etc/.nsmount-fake-etc"), "fake /etc not in place"
    assert open("/etc/shadow").read() == SHADOW


def tree_snapshot(root, *, stop_at_mounts=True):
    """path -> (type, inode, mode, uid, gid, content hash / link target), not following
    symlinks and not descending into other mounts."""
    out = {}
    try:
        rdev = os.lstat(root).st_dev
    except FileNotFoundError:
        return {root: None}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in list(dirnames) + filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            extra = ""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    extra = hashlib.sha1(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            out[p] = (stat.S_IFMT(st.st_mode), st.st_ino, stat.S_IMODE(st.st_mode),
                      st.st_uid, st.st_gid, st.st_rdev, extra)
        if stop_at_mounts:
            dirnames[:] = [d for d in dirnames
                           if os.lstat(os.path.join(dirpath, d)).st_dev == rdev
                           and not os.path.islink(os.path.join(dirpath, d))]
    st = os.lstat(root)
    out[root] = (stat.S_IFMT(st.st_mode), st.st_ino, stat.S_IMODE(st.st_mode), st.st_uid,
                 st.st_gid, 0, "")
    return out


def mountinfo():
    with open("/proc/self/mountinfo") as fh:
        return set(fh.read().splitlines())


def mountpoints(pid="self"):
    out = []
    with open(f"/proc/{pid}/mountinfo") as fh:
        for line in fh:
            mp = line.split(" ")[4]
            out.append(mp.encode().decode("unicode_escape") if "\\" in mp else mp)
    return out


class Guard:
    """Snapshots of what must never change: the fake /etc, extra watched trees, the
    sandbox host's /dev (outside hugetlbfs) and its mount table."""

    def __init__(self, *watch):
        self.watch = ("/etc", "/dev") + watch
        self.trees = {w: tree_snapshot(w) for w in self.watch}
        self.mi = mountinfo()

    def check(self, allowed_new_mounts=()):
        """Differences, except the mount points in ``allowed_new_mounts`` (real paths)
        and their mounts."""
        problems = []
        for w in self.watch:
            now = tree_snapshot(w)
            if now != self.trees[w]:
                before = self.trees[w]
                for p in sorted(set(before) | set(now)):
                    if p in allowed_new_mounts or any(
                            a.startswith(p + "/") and p not in before for a in allowed_new_mounts):
                        continue
                    if before.get(p) != now.get(p):
                        problems.append(f"{p}: {before.get(p)} -> {now.get(p)}")
        mi = mountinfo()
        gone = self.mi - mi
        esc = {a.replace("\\", "\\134").replace(" ", "\\040").replace("\n", "\\012")
               .replace("\t", "\\011") for a in allowed_new_mounts}
        new = [l for l in mi - self.mi if l.split(" ")[4] not in esc]
        if gone:
            problems.append(f"sandbox mounts gone: {sorted(gone)}")
        if new:
            problems.append(f"sandbox mounts added: {sorted(new)}")
        return problems


def start_vm(name="x", id=3, devices=("/dev/loop0",), hugepages=True, **extra):
    """`nsmount exec --spec F -- sleep 1000`; returns the Popen once the record exists."""
    spec = write_spec(f"/run/spec-{name}.toml", name=name, id=id, devices=list(devices),
                      hugepages=hugepages, **extra)
    p = subprocess.Popen([PY, "-m", "nsmount", "exec", "--spec", spec, "--", "sleep", "1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        if os.path.exists(f"/run/nsmount/vms/{p.pid}.json"):
            # exec done once comm is sleep
            try:
                if open(f"/proc/{p.pid}/comm").read().strip() == "sleep":
                    return p
            except FileNotFoundError:
                pass
        if p.poll() is not None:
            raise AssertionError(f"exec failed {p.returncode}: {p.communicate()}")
        time.sleep(0.02)
    raise AssertionError("VM did not start")


def invm(pid, script, check=True):
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", script],
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"in-VM script failed: {r.returncode} {r.stderr}")
    return r


def nsm_json(*args, **kw):
    r = nsm(*args, "--json", **kw)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from nsmount {args}: rc={r.returncode}\n"
                             f"{r.stdout}\n{r.stderr}")
    return r.returncode, data, r.stderr


def mount_hugetlbfs(path):
    os.makedirs(path, exist_ok=True)
    sh(["mount", "-t", "hugetlbfs", "-o", "nosuid,nodev", "hugetlbfs", path])


def vm_mounts_at(pid, path):
    return sum(1 for mp in mountpoints(pid) if mp == path)


def emit(**kw):
    print(json.dumps(kw, default=str))
'''


# --------------------------------------------------------------------------- cases
# Each case: (VM-side setup + nsmount runs + assertions) as sandbox code.  The common
# prelude (PRELUDE) provides the fake /etc, snapshots and helpers; every case ends
# with guard.check() == [] (nothing outside the VM's own /dev changed).
CASES: dict[str, tuple[str, list[str]]] = {}


def case(name: str, hugetlbfs: tuple[str, ...] = ()):
    def deco(code: str) -> str:
        CASES[name] = (code, list(hugetlbfs))
        return code
    return deco


case("hugepages_symlink_to_etc_reconnect")("""
vm = start_vm(hugepages=False)
invm(vm.pid, "ln -s /etc /dev/hugepages")
g = Guard()
mount_hugetlbfs("/dev/hugepages")
rc, rep, _ = nsm_json("reconnect", vm.pid)
o = rep["vms"][0]
assert rc == 1 and o["status"] == "repaired", rep
assert any("/dev/hugepages -> /etc" in w for w in o["warnings"]), o
assert any(d["kind"] == "planted" and d["path"] == "/dev/hugepages" for d in o["drift"]), o
assert vm_mounts_at(vm.pid, "/dev/hugepages") == 1
assert nsm("reconnect", vm.pid).returncode == 0
assert not os.path.exists("/etc/libvirt/qemu/3-x")
problems = g.check(["/dev/hugepages"])
""")

case("node_symlink_to_shadow")("""
vm = start_vm()
g = Guard()
invm(vm.pid, "rm /dev/null; ln -s /etc/shadow /dev/null; chmod 600 /dev/zero")
rc, o, _ = nsm_json("repair", vm.pid)
assert rc == 1 and o["status"] == "repaired", o
assert any(d["kind"] == "planted" and d["path"] == "/dev/null" for d in o["drift"]), o
assert invm(vm.pid, "stat -c %F:%t:%T /dev/null").stdout.strip() == "character special file:1:3"
assert open("/etc/shadow").read() == SHADOW
problems = g.check()
""")

case("byid_parent_dir_symlink_repair")("""
os.makedirs("/dev/disk/by-id"); os.symlink("../../loop1", "/dev/disk/by-id/usb-X")
vm = start_vm(devices=["/dev/disk/by-id/usb-X"])
g = Guard()
invm(vm.pid, "rm -rf /dev/disk; ln -s /etc /dev/disk")
rc, o, _ = nsm_json("repair", vm.pid)
assert rc == 1, o
kinds = {(d["kind"], d["path"]) for d in o["drift"]}
assert ("planted", "/dev/disk") in kinds and ("unsafe-path", "/dev/disk/by-id/usb-X") in kinds, o
assert invm(vm.pid, "readlink /dev/disk/by-id/usb-X").stdout.strip() == "../../loop1"
assert not os.path.exists("/etc/by-id")
assert nsm("repair", vm.pid).returncode == 0
problems = g.check()
""")

case("byid_hotplug_parent_dir_symlink")("""
os.makedirs("/dev/disk/by-id"); os.symlink("../../loop1", "/dev/disk/by-id/usb-X")
vm = start_vm(devices=[])
g = Guard()
invm(vm.pid, "ln -s /etc /dev/disk")
rc, o, _ = nsm_json("device", "add", vm.pid, "/dev/disk/by-id/usb-X")
assert rc == 1 and o["status"] == "repaired", o
assert any(d["kind"] == "unsafe-path" for d in o["drift"]), o
assert not os.path.exists("/etc/by-id")
r = invm(vm.pid, "test -b /dev/loop1 && test -L /dev/disk/by-id/usb-X", check=False)
assert r.returncode == 0
problems = g.check()
""")

case("vfio_dir_symlink_flip_race")("""
os.makedirs("/dev/vfio"); os.mknod("/dev/vfio/vfio", 0o666 | stat.S_IFCHR, os.makedev(10, 196))
os.chmod("/dev/vfio/vfio", 0o666)
os.makedirs("/tmp/x")
vm = start_vm(devices=["/dev/vfio/vfio"], hugepages=False)
g = Guard("/tmp/x")
bg = subprocess.Popen(["nsenter", "-t", str(vm.pid), "-m", "sh", "-c",
                       "while :; do rm -rf /dev/vfio; ln -s /tmp/x /dev/vfio; rm -f /dev/vfio;"
                       " mkdir /dev/vfio; done"], stderr=subprocess.DEVNULL)
codes = set()
for _ in range(50):
    r = nsm("repair", vm.pid)
    codes.add(r.returncode)
    assert "Traceback" not in r.stderr, r.stderr
bg.kill(); bg.wait()
assert codes <= {0, 1, 2}, codes
assert os.listdir("/tmp/x") == []
problems = g.check()
""")

case("node_symlink_flip_race")("""
vm = start_vm(hugepages=False)
g = Guard()
bg = subprocess.Popen(["nsenter", "-t", str(vm.pid), "-m", "sh", "-c",
                       "while :; do chmod 600 /dev/null; rm -f /dev/null; "
                       "ln -s /etc/shadow /dev/null; rm -f /dev/null; "
                       "mknod -m 600 /dev/null c 1 3; done"], stderr=subprocess.DEVNULL)
codes = set()
for _ in range(30):
    r = nsm("repair", vm.pid)
    codes.add(r.returncode)
    assert "Traceback" not in r.stderr, r.stderr
bg.kill(); bg.wait()
assert codes <= {0, 1, 2}, codes
problems = g.check()
""")

case("hugepage_domain_dir_planted", hugetlbfs=("/dev/hugepages",))("""
vm = start_vm()
g = Guard()
# a symlink on hugetlbfs itself: refused by this kernel (EINVAL) -> plant a bind of /etc
r = invm(vm.pid, "rmdir /dev/hugepages/libvirt/qemu/3-x && "
                 "ln -s /etc /dev/hugepages/libvirt/qemu/3-x", check=False)
if r.returncode == 0:
    how = "symlink"
else:
    how = "bind"
    invm(vm.pid, "mkdir -p /dev/hugepages/libvirt/qemu/3-x; "
                 "mount --bind /etc /dev/hugepages/libvirt/qemu/3-x")
rc, o, _ = nsm_json("repair", vm.pid)
assert rc == 2 and o["status"] == "failed", o
assert any(d["kind"] == "missing-hugepage-dir" for d in o["drift"]), o
assert "refusing" in o["error"] or "planted" in o["error"], o
rc2, rep, _ = nsm_json("reconnect", vm.pid)
assert rc2 == 2 and rep["vms"][0]["status"] == "failed", rep
assert stat.S_IMODE(os.stat("/etc").st_mode) == 0o755
problems = g.check()
""")

case("hugepage_libvirt_component_planted", hugetlbfs=("/dev/hugepages",))("""
vm = start_vm()
g = Guard()
invm(vm.pid, "rmdir /dev/hugepages/libvirt/qemu/3-x; mount --bind /etc /dev/hugepages/libvirt/qemu")
rc, o, _ = nsm_json("repair", vm.pid)
assert rc == 2 and o["status"] == "failed" and "planted" in o["error"], o
assert not os.path.exists("/etc/3-x")
rc2, rep, _ = nsm_json("reconnect", vm.pid)
assert rc2 == 2 and not os.path.exists("/etc/3-x"), rep
problems = g.check()
""")

case("fifo_at_node")("""
vm = start_vm(hugepages=False)
g = Guard()
invm(vm.pid, "rm /dev/null; mkfifo /dev/null")
rc, o, _ = nsm_json("repair", vm.pid, timeout=20)   # never opens (blocks on) the FIFO
assert rc == 1 and any(d["kind"] == "wrong-node" for d in o["drift"]), o
assert invm(vm.pid, "test -c /dev/null", check=False).returncode == 0
problems = g.check()
""")

case("socket_at_node")("""
vm = start_vm(hugepages=False)
g = Guard()
invm(vm.pid, "rm /dev/zero; " + PY + " -c \\"import socket; "
             "socket.socket(socket.AF_UNIX).bind('/dev/zero')\\"")
rc, o, _ = nsm_json("repair", vm.pid, timeout=20)
assert rc == 1 and "is sock" in json.dumps(o["drift"]), o
assert invm(vm.pid, "test -c /dev/zero", check=False).returncode == 0
problems = g.check()
""")

case("directory_at_node")("""
vm = start_vm(hugepages=False)
g = Guard()
invm(vm.pid, "rm /dev/full; mkdir /dev/full; touch /dev/full/keep")
rc, o, _ = nsm_json("repair", vm.pid)
assert rc == 2 and o["status"] == "failed" and "/dev/full" in o["error"], o
assert invm(vm.pid, "test -f /dev/full/keep", check=False).returncode == 0  # not rm -rf'd
problems = g.check()
""")

case("regular_file_at_mount_point")("""
vm = start_vm(hugepages=False)
invm(vm.pid, "echo data > /dev/hugepages")
g = Guard()
mount_hugetlbfs("/dev/hugepages")
rc, rep, _ = nsm_json("reconnect", vm.pid)
o = rep["vms"][0]
assert rc == 1 and any(d["kind"] == "planted" for d in o["drift"]), o
assert vm_mounts_at(vm.pid, "/dev/hugepages") == 1
problems = g.check(["/dev/hugepages"])
""")

case("bind_of_etc_at_parent_dir")("""
os.makedirs("/dev/vfio"); os.mknod("/dev/vfio/vfio", 0o666 | stat.S_IFCHR, os.makedev(10, 196))
vm = start_vm(devices=["/dev/vfio/vfio"], hugepages=False)
g = Guard()
invm(vm.pid, "rm -rf /dev/vfio; mkdir /dev/vfio; mount --bind /etc /dev/vfio")
rc, o, _ = nsm_json("repair", vm.pid)
assert rc == 2 and "not on the VM's own /dev tmpfs" in o["error"], o
assert not os.path.exists("/etc/vfio")
rc2, rep, _ = nsm_json("reconnect", vm.pid)
assert rc2 == 2, rep
problems = g.check()
""")

case("bind_of_etc_at_mount_point")("""
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
assert vm_mounts_at(vm.pid, "/dev/hugepages") == 1            # not stacked
problems = g.check(["/dev/hugepages"])
""")

case("symlink_at_submount")("""
vm = start_vm(hugepages=False)
g = Guard()
invm(vm.pid, "umount /dev/shm; rmdir /dev/shm; ln -s /etc /dev/shm")
rc, o, _ = nsm_json("repair", vm.pid)
assert rc == 1 and any(d["kind"] == "planted" and d["path"] == "/dev/shm" for d in o["drift"]), o
assert vm_mounts_at(vm.pid, "/dev/shm") == 1
assert nsm("repair", vm.pid).returncode == 0
problems = g.check()
""")

case("symlink_at_mount_point_parent")("""
vm = start_vm(hugepages=False)
invm(vm.pid, "ln -s /etc /dev/hp")
g = Guard()
mount_hugetlbfs("/dev/hp/2M")
rc, rep, _ = nsm_json("reconnect", vm.pid)
assert rc == 1, rep
assert vm_mounts_at(vm.pid, "/dev/hp/2M") == 1 and not os.path.exists("/etc/2M")
assert nsm("reconnect", vm.pid).returncode == 0
problems = g.check(["/dev/hp/2M"])
""")

case("dotdot_in_configured_paths")("""
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
problems = g.check()
""")

case("dotdot_in_hotplug_paths")("""
vm = start_vm(hugepages=False)
g = Guard()
for verb, path in (("add", "/dev/../etc/shadow"), ("add", "/dev/net/../../etc/passwd"),
                   ("remove", "/dev/../etc/passwd"), ("add", "dev/null")):
    r = nsm("device", verb, vm.pid, path)
    assert r.returncode == 4 and "Traceback" not in r.stderr, (verb, path, r)
problems = g.check()
""")

case("hotplug_host_symlink_leaving_dev")("""
os.symlink("/etc/shadow", "/dev/evil")
vm = start_vm(hugepages=False)
g = Guard()
r = nsm("device", "add", vm.pid, "/dev/evil")
assert r.returncode == 4 and "outside /dev" in r.stderr, r
assert invm(vm.pid, "test -e /dev/evil || test -L /dev/evil", check=False).returncode != 0
problems = g.check()
""")

case("newline_and_space_in_mount_points")("""
vm = start_vm(hugepages=False)
g = Guard()
weird = "/mnt/a b\\nc"
os.makedirs(weird); sh(["mount", "-t", "tmpfs", "tmpfs", weird])
mount_hugetlbfs("/dev/hp a\\nb")
rc, o, _ = nsm_json("inspect", vm.pid)
assert rc == 0 and weird in [m["target"] for m in o["mounts"]], o["mounts"]
assert any(d["path"] == "/dev/hp a\\nb" for d in o["drift"]), o["drift"]
assert nsm("inspect", vm.pid).returncode == 0
rc, rep, _ = nsm_json("reconnect", vm.pid)
assert rc == 1, rep
assert vm_mounts_at(vm.pid, "/dev/hp a\\nb") == 1 and vm_mounts_at(vm.pid, weird) == 1
assert nsm("reconnect", vm.pid).returncode == 0 and nsm("repair", vm.pid).returncode == 0
problems = g.check([weird, "/dev/hp a\\nb"])
""")

case("huge_dev_listing")("""
vm = start_vm(hugepages=False)
g = Guard()
invm(vm.pid, "cd /dev/shm && seq 1 20000 | xargs touch; mkdir /dev/junk; "
             "cd /dev/junk && seq 1 6000 | xargs touch")
t = time.monotonic()
rc, o, _ = nsm_json("inspect", vm.pid)
assert rc == 0 and len(o["dev"]) >= 4096, len(o["dev"])
assert nsm("repair", vm.pid).returncode == 0
assert time.monotonic() - t < 15
problems = g.check()
""")

case("dev_not_a_tmpfs")("""
write_spec("/run/y.toml", name="y", id=7, devices=[])
p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c",
                      "mount -t ramfs -o mode=755 ramfs /dev && exec sleep 1000"])
for _ in range(200):
    if open(f"/proc/{p.pid}/comm").read().strip() == "sleep": break
    time.sleep(0.02)
g = Guard()
n_dev = vm_mounts_at(p.pid, "/dev")
rc, o, _ = nsm_json("repair", "--spec", "/run/y.toml", p.pid)
assert rc == 2 and o["drift"][0]["kind"] == "foreign-dev", o
assert "ramfs" in o["drift"][0]["detail"] and not o["results"], o
rc, o, _ = nsm_json("repair", "--rebuild-dev", "--spec", "/run/y.toml", p.pid)
assert rc == 1 and o["results"][0]["action"] == "swap-dev", o
assert nsm("repair", "--spec", "/run/y.toml", p.pid).returncode == 0
assert vm_mounts_at(p.pid, "/dev") == n_dev              # swapped, not stacked
problems = g.check()
""")

case("dev_shared_with_host")("""
write_spec("/run/y.toml", name="y", id=7, devices=[])
p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sleep", "1000"])
time.sleep(0.3)
g = Guard()
rc, o, _ = nsm_json("repair", "--spec", "/run/y.toml", p.pid)
assert rc == 2 and [d["kind"] for d in o["drift"]] == ["foreign-dev"], o
assert "host namespace" in o["drift"][0]["detail"] and not o["results"], o
problems = g.check()
""")

case("lock_file_symlink")("""
a = start_vm(name="a", id=1, hugepages=False)
b = start_vm(name="b", id=2, hugepages=False)
st = open(f"/proc/{a.pid}/stat").read().rsplit(")", 1)[1].split()[19]
lock = f"/run/nsmount/locks/{a.pid}-{st}.lock"
invm(a.pid, f"mkdir -p /run/nsmount/locks && ln -s /etc/shadow {lock}")
invm(b.pid, "rm /dev/null")
g = Guard()
r = nsm("repair", a.pid)
assert r.returncode == 4 and "symbolic links" in r.stderr, r
rc, rep, _ = nsm_json("reconnect", "--no-scan")
by = {o["name"]: o for o in rep["vms"]}
assert rc == 2 and by["a"]["status"] == "failed" and by["b"]["status"] == "repaired", rep
problems = g.check()
""")

case("record_tmp_symlink")("""
vm = start_vm(hugepages=False)
invm(vm.pid, PY + " -c 'import os\\nfor i in range(1, 5000): os.symlink(\\"/etc/shadow\\", "
             f"\\"/run/nsmount/vms/{vm.pid}.json.tmp.%d\\" % i)'")
g = Guard()
r = nsm("device", "add", vm.pid, "/dev/loop2")
assert r.returncode == 1, r
assert not os.path.islink(f"/run/nsmount/vms/{vm.pid}.json")
assert "/dev/loop2" in open(f"/run/nsmount/vms/{vm.pid}.json").read()
problems = g.check()
""")

case("state_dir_symlink")("""
vm = start_vm(hugepages=False)
st = open(f"/proc/{vm.pid}/stat").read().rsplit(")", 1)[1].split()[19]
invm(vm.pid, "rm -rf /run/nsmount/locks; ln -s /etc /run/nsmount/locks")
g = Guard()
r = nsm("repair", vm.pid)
assert r.returncode == 4 and "Traceback" not in r.stderr, r
assert not os.path.exists(f"/etc/{vm.pid}-{st}.lock")
problems = g.check()
""")


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile(name: str) -> None:
    code, hugetlbfs = CASES[name]
    res = run_in_sandbox(PRELUDE + "\nsetup_fake_etc()\n" + code + "\nemit(problems=problems)\n",
                         hugetlbfs=hugetlbfs, check=False, timeout=150)
    assert res.returncode == 0, res.describe()
    assert res.json()["problems"] == [], res.describe()


def test_case_count() -> None:
    assert len(CASES) >= 20
