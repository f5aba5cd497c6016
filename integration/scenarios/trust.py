"""Hostile VMs that attack nsmount's trust boundaries (issue 8).

Each ``case_*`` runs inside its own sandbox as the fake hypervisor host, sets up stand-in
VMs (privileged ones launched with ``nsmount exec -- sh -c ...``; unprivileged ones that,
as uid 107, ``unshare -Urm`` themselves and keep the launch record's pid and start time),
attacks, runs nsmount and prints ONE JSON line: ``pre`` (did the attack take effect
inside the VM; all must be true or the test setup is broken), the nsmount runs, what the
VM and the host look like afterwards, and ``problems`` (what changed outside the VM's own
/dev tmpfs and the per-domain hugepage directories).  integration/test_hostile_trust.py
asserts on it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from typing import Any

from vmhelpers import (
    PY,
    emit,
    invm,
    mount_hugetlbfs,
    mountinfo_lines,
    read_text,
    sh,
    start_vm,
    vm_stat,
)

from .support import (
    Guard,
    file_state,
    mount_at_cwd,
    outcomes,
    run,
    setup_failed,
    setup_fake_etc,
    start_plain,
    tree_snapshot,
    vm_mounts_at,
)

#: the VM's own python (the sandbox's venv interpreter may live where uid 107 cannot go)
VM_PY = "/usr/bin/python3"

#: every nsmount call of the reconnect-style cases runs under this cap: a state file that
#: is a symlink to /dev/zero must not be able to eat the machine's memory.
CAPPED = ("timeout", "-s", "KILL", "30", "prlimit", "--as=2147483648", "--")

#: python run by the VM (as its own root) to cover /proc with a tmpfs whose
#: thread-self/fd/N and self/fd/N are symlinks to VICTIM; mountinfo kept as a copy
PLANT_PROC = r'''
import os, sys
victim, fifo = sys.argv[1], sys.argv[2] == "fifo"
mi = open("/proc/self/mountinfo").read()
r = os.system("mount -t tmpfs -o mode=755 tmpfs /proc")
assert r == 0, r
for d in ("thread-self", "self"):
    os.makedirs(f"/proc/{d}/fd")
    if fifo:
        os.mkfifo(f"/proc/{d}/mountinfo")
    else:
        open(f"/proc/{d}/mountinfo", "w").write(mi)
    if victim != "-":
        for i in range(1024):
            os.symlink(victim, f"/proc/{d}/fd/{i}")
'''


def _plant_proc_cmd(victim: str, fifo: bool = False) -> str:
    return f"{VM_PY} -I -c '{PLANT_PROC}' {victim} {'fifo' if fifo else 'copy'}"


def _pid_mntns_report(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as fh:
        return sorted(" ".join(ln.split(" - ")[0].split(" ")[4:5] + ln.split(" - ")[1:])
                      for ln in fh.read().splitlines())


# ============================================================= 1. foreign namespaces
def case_foreign_mntns(variant: str) -> None:
    """A VM whose mount namespace is not the one nsmount built: owned by its own user
    namespace (unprivileged QEMU, ``unshare -Urm``) or a new one it made as root
    (``unshare -m``).  Single-VM commands must refuse (exit 15); reconnect must fail it
    and still repair the other VM."""
    setup_fake_etc()
    good = start_vm("good", 1)
    invm(good.pid, "rm /dev/null")
    os.makedirs("/tmp/vmplay", mode=0o777)
    if variant == "unpriv-userns":
        vm = start_vm("evil", 2, unpriv=True,
                      script="mount -t tmpfs tmpfs /tmp/vmplay")
    else:  # priv-new-mntns: root VM that made itself a fresh mount namespace
        vm = start_vm("evil", 2, prefix=("unshare", "-m", "--propagation", "unchanged"),
                      script="rm /dev/null")
    pid = vm.pid
    user_ns = os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
    if variant == "unpriv-userns":
        pre = {"own_userns": user_ns,
               "vm_mount_made": any(" /tmp/vmplay " in ln
                                    for ln in mountinfo_lines(pid))}
    else:
        pre = {"host_userns": not user_ns, "null_removed": vm_stat(pid, "/dev/null") == ""}
    if setup_failed(pre):
        return
    g = Guard()
    dev_before = tree_snapshot(f"/proc/{pid}/root/dev")
    mnt_before = _pid_mntns_report(pid)
    runs = {
        "inspect": run(["inspect", pid]),
        "repair": run(["repair", pid]),
        "device_add": run(["device", "add", pid, "/dev/loop2"]),
        "run_in": run(["run-in", pid, "--", "touch", "/tmp/vmplay/RUNIN-RAN"]),
    }
    runin_ran = os.path.exists("/tmp/vmplay/RUNIN-RAN") or invm(
        pid, "test -e /tmp/vmplay/RUNIN-RAN", check=False).returncode == 0
    rec = run(["reconnect", "--json"], prefix=CAPPED)
    emit(pre=pre, runs=runs, runin_ran=runin_ran, reconnect=rec, vms=outcomes(rec),
         good_pid=good.pid, evil_pid=pid,
         good_null=vm_stat(good.pid, "/dev/null"),
         evil_dev_changed=tree_snapshot(f"/proc/{pid}/root/dev") != dev_before,
         evil_mounts_changed=_pid_mntns_report(pid) != mnt_before,
         problems=g.problems(allowed_paths=["/tmp/vmplay"]))


# ============================================================= 2. attributes via /proc
def case_proc_fd_symlinks(variant: str) -> None:
    """The VM covers its /proc with a tmpfs whose thread-self/fd/N are symlinks to a host
    file; nsmount then sets owner/mode/ACL on the VM's nodes (repair) or makes the
    per-domain hugepage directory inside the VM (reconnect after a hugetlbfs mount)."""
    setup_fake_etc()
    victim = "/run/victim"
    with open(victim, "w") as fh:
        fh.write("host secret\n")
    os.chmod(victim, 0o600)
    os.setxattr(victim, "user.keep", b"1")
    sh(["setfacl", "-m", "u:107:rw", "/dev/loop0"])  # ACL xattr nsmount must copy
    g = Guard("/run/victim")
    victim_before = file_state(victim)
    obs: dict[str, Any] = {}
    if variant == "priv":
        vm = start_vm("x", 3, devices=["/dev/loop0"])
        invm(vm.pid, "chmod 600 /dev/null && rm /dev/loop0 && " + _plant_proc_cmd(victim))
        pre = {"proc_planted": invm(vm.pid, "readlink /proc/thread-self/fd/7",
                                    check=False).stdout.strip() == victim,
               "null_broken": vm_stat(vm.pid, "/dev/null").split(" ")[3:4] == ["600"]}
        if setup_failed(pre):
            return
        obs["repair"] = run(["repair", "--json", vm.pid])
        obs["null_after"] = vm_stat(vm.pid, "/dev/null")
        obs["loop0_after"] = vm_stat(vm.pid, "/dev/loop0")
        hp = None
    else:  # unprivileged QEMU in its own user namespace; hugetlbfs arrives later
        vm = start_vm("x", 3, devices=["/dev/loop0"], hugepages=True, uid=107, gid=107,
                      unpriv=True, script=_plant_proc_cmd(victim))
        pre = {"proc_planted": invm(vm.pid, "readlink /proc/thread-self/fd/7",
                                    check=False).stdout.strip() == victim}
        if setup_failed(pre):
            return
        hp = "/dev/hugepages"
        mount_hugetlbfs(hp)
        obs["reconnect"] = run(["reconnect", "--json", vm.pid], prefix=CAPPED)
        obs["vms"] = outcomes(obs["reconnect"])
        obs["repair"] = run(["repair", "--json", vm.pid])
    emit(pre=pre, **obs, victim_before=victim_before, victim_after=file_state(victim),
         problems=g.problems(allowed_mounts=[hp] if hp else [],
                             allowed_paths=[hp] if hp else []))


# ============================================================= 3. run-in
def case_run_in_planted_binary(variant: str) -> None:
    """The VM mounts a tmpfs over /usr/local/bin holding its own ``probe``; the host's
    /usr/local/bin/probe is a copy of touch.  ``run-in VM -- probe MARK`` must never run
    the VM's file as host root."""
    setup_fake_etc()
    sh(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/usr/local/bin"])  # sandbox only
    shutil.copy2("/usr/bin/touch", "/usr/local/bin/probe")
    os.chmod("/tmp", 0o1777)
    planted = ("mount -t tmpfs -o mode=755 tmpfs /usr/local/bin && "
               "printf '#!/bin/sh\\ntouch /tmp/PLANTED-RAN\\n' > /usr/local/bin/probe && "
               "chmod 755 /usr/local/bin/probe")
    if variant == "priv":
        vm = start_vm("x", 3)
        invm(vm.pid, planted)
    else:
        vm = start_vm("x", 3, unpriv=True, script=planted)
    head = invm(vm.pid, "head -c 2 /usr/local/bin/probe", check=False).stdout
    with open("/usr/local/bin/probe", "rb") as fh:
        host_head = fh.read(4)
    pre = {"vm_probe_is_script": head == "#!", "host_probe_is_elf": host_head == b"\x7fELF"}
    if setup_failed(pre):
        return
    g = Guard("/usr/local/bin")
    r = run(["run-in", vm.pid, "--", "probe", "/tmp/HOST-PROBE-RAN"],
            env={"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    time.sleep(0.2)
    emit(pre=pre, run_in=r, planted_ran=os.path.exists("/tmp/PLANTED-RAN"),
         host_ran=os.path.exists("/tmp/HOST-PROBE-RAN"),
         problems=g.problems(allowed_paths=["/tmp/HOST-PROBE-RAN"]))


# ============================================================= 4. foreign /dev
#: run by the attacker inside the VM: a bind of argv[1] slid beneath the VM's /dev tmpfs
#: (open_tree CLONE + move_mount F_EMPTY_PATH|BENEATH), so that its ``umount -l /dev``
#: reveals that sandbox directory.  Without it the VM would reveal the REAL root
#: filesystem's /dev directory, which the sandbox cannot protect.
DECOY_BENEATH = r'''
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.syscall(428, -100, sys.argv[1].encode(), 1 | os.O_CLOEXEC)
if fd < 0 or libc.syscall(429, fd, b"", -100, b"/dev", 0x4 | 0x200) != 0:
    sys.exit("decoy beneath /dev: " + os.strerror(ctypes.get_errno()))
'''


def case_foreign_dev(variant: str) -> None:
    """The VM's /dev is not its own private tmpfs: a bind of a host directory, or (after
    ``umount -l /dev``) whatever lies beneath.  nsmount must report ``foreign-dev``,
    write nothing there, exit 2; ``--rebuild-dev`` must replace it with a new tmpfs."""
    setup_fake_etc()
    hostdir = "/run/hostdir"
    os.makedirs(hostdir + "/sub")
    with open(hostdir + "/zero", "w") as fh:
        fh.write("host file named zero\n")
    with open(hostdir + "/MARK", "w") as fh:
        fh.write("mark\n")
    watch = [hostdir]
    obs: dict[str, Any] = {}
    if variant == "priv-umount-l":
        os.makedirs("/mnt/rootfs")
        sh(["mount", "--bind", "/", "/mnt/rootfs"])  # non-recursive: the rootfs itself
        watch.append("/mnt/rootfs/dev")
        vm = start_vm("x", 3)
        invm(vm.pid, f"{VM_PY} -I -c '{DECOY_BENEATH}' {hostdir} && umount -l /dev")
    elif variant == "priv-bind":
        vm = start_vm("x", 3)
        invm(vm.pid, f"mount --bind {hostdir} /dev")
    else:  # unpriv-bind: uid 107 binds a directory it owns over /dev
        os.chown(hostdir, 107, 107)
        vm = start_vm("x", 3, unpriv=True, script=f"mount --bind {hostdir} /dev")
    pre = {"vm_dev_is_hostdir": invm(vm.pid, "test -f /dev/MARK && test -f /dev/zero",
                                     check=False).returncode == 0}
    if setup_failed(pre):
        return
    g = Guard(*watch)
    obs["repair"] = run(["repair", "--json", vm.pid])
    obs["hostdir_after_repair"] = g.problems()
    if variant != "unpriv-bind":
        obs["rebuild"] = run(["repair", "--rebuild-dev", "--json", vm.pid])
        obs["vm_dev_fstype"] = invm(vm.pid, "stat -f -c %T /dev", check=False).stdout.strip()
        obs["vm_null"] = vm_stat(vm.pid, "/dev/null")
        obs["vm_mark_gone"] = invm(vm.pid, "test -e /dev/MARK", check=False).returncode != 0
        obs["after_rebuild"] = run(["repair", "--json", vm.pid])
    emit(pre=pre, **obs, problems=g.problems())


# ============================================================= 5. discovery
FAKE_QEMU_DIR = "/tmp/u1000"


def case_fake_qemu_discovery() -> None:
    """uid 1000 runs ``unshare -Urm``, binds its own directory over /dev and starts a
    binary named qemu-system-x86_64 with -drive file=/dev/loop7 -mem-path
    /dev/hugepages.  Plain ``reconnect`` must not adopt it."""
    setup_fake_etc()
    good = start_vm("good", 1, hugepages=True)
    invm(good.pid, "rm /dev/null")
    os.makedirs(FAKE_QEMU_DIR + "/bin")
    os.makedirs(FAKE_QEMU_DIR + "/dev")
    with open(FAKE_QEMU_DIR + "/dev/keep", "w") as fh:
        fh.write("user data\n")
    shutil.copy2("/bin/dash", FAKE_QEMU_DIR + "/bin/qemu-system-x86_64")
    sh(["chown", "-R", "1000:1000", FAKE_QEMU_DIR])
    inner = (f"mount --bind {FAKE_QEMU_DIR}/dev /dev && exec {FAKE_QEMU_DIR}/bin/"
             "qemu-system-x86_64 -c 'sleep 1000; :' -drive file=/dev/loop7,format=raw "
             "-mem-path /dev/hugepages -m 64")
    fake = start_plain(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                        "unshare", "-Urm", "sh", "-c", inner], want_comm="qemu-system-x86")
    pre = {"fake_comm": read_text(f"/proc/{fake.pid}/comm").strip() == "qemu-system-x86",
           "fake_dev_is_user_dir": os.path.exists(f"/proc/{fake.pid}/root/dev/keep"),
           "fake_own_mntns": os.stat(f"/proc/{fake.pid}/ns/mnt").st_ino
           != os.stat("/proc/self/ns/mnt").st_ino}
    if setup_failed(pre):
        return
    mounts_before = _pid_mntns_report(fake.pid)
    g = Guard(FAKE_QEMU_DIR, "/dev/hugepages")
    rec = run(["reconnect", "--json"], prefix=CAPPED)
    emit(pre=pre, reconnect=rec, vms=outcomes(rec), fake_pid=fake.pid, good_pid=good.pid,
         fake_mounts_changed=_pid_mntns_report(fake.pid) != mounts_before,
         host_hugepage_dirs=sorted(os.listdir("/dev/hugepages/libvirt/qemu"))
         if os.path.isdir("/dev/hugepages/libvirt/qemu") else [],
         problems=g.problems(allowed_paths=["/dev/hugepages/libvirt/qemu/1-good"]))


# ============================================================= 6. hangs
def case_mountinfo_fifo() -> None:
    """The VM covers /proc with a tmpfs where thread-self/mountinfo is a FIFO: nothing
    may hang (the VM's mount table is read from the host side)."""
    setup_fake_etc()
    good = start_vm("good", 1)
    vm = start_vm("fifo", 2)
    invm(good.pid, "rm /dev/null")
    invm(vm.pid, _plant_proc_cmd("-", fifo=True))
    pre = {"mountinfo_is_fifo":
           invm(vm.pid, "test -p /proc/thread-self/mountinfo", check=False).returncode == 0}
    if setup_failed(pre):
        return
    g = Guard()
    obs = {"inspect": run(["inspect", "--json", vm.pid], timeout=25),
           "repair": run(["repair", "--json", vm.pid], timeout=25)}
    rec = run(["reconnect"], timeout=40, prefix=CAPPED)
    emit(pre=pre, **obs, reconnect=rec, good_null=vm_stat(good.pid, "/dev/null"),
         problems=g.problems())


FUSE_HOLDER = r'''
import os, ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/fuse", os.O_RDWR)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
if libc.mount(b"hung", b"/dev/shm", b"fuse", 0, opts) != 0:
    sys.exit(f"fuse mount: {os.strerror(ctypes.get_errno())}")
open("/run/fuse-ready", "w").close()
time.sleep(100000)   # holds the fuse fd, never answers a request
'''


def case_hung_vm_timeout() -> None:
    """A root VM stacks an unanswered FUSE mount on /dev/shm: every access blocks.  The
    single-VM commands must give up at --timeout (exit 16, "timed out"); reconnect must
    fail that VM, repair the other, print the summary and exit 2 in bounded time."""
    setup_fake_etc()
    if not os.path.exists("/dev/fuse"):
        os.mknod("/dev/fuse", 0o666 | stat.S_IFCHR, os.makedev(10, 229))
        os.chmod("/dev/fuse", 0o666)
    good = start_vm("good", 1)
    vm = start_vm("hung", 2, devices=["/dev/loop0", "/dev/fuse"])
    invm(good.pid, "rm /dev/null")
    holder = subprocess.Popen(["nsenter", "-t", str(vm.pid), "-m", PY, "-I", "-c",
                               FUSE_HOLDER], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not os.path.exists("/run/fuse-ready") and time.monotonic() < deadline:
        if holder.poll() is not None:
            err = holder.stderr.read() if holder.stderr else b""
            raise AssertionError(f"fuse holder died: {err!r}")
        time.sleep(0.05)
    probe = invm(vm.pid, "timeout -s KILL 2 stat /dev/shm/x", check=False)
    pre = {"fuse_mounted": any(" /dev/shm " in ln and " - fuse " in ln
                               for ln in mountinfo_lines(vm.pid)),
           "access_hangs": probe.returncode in (124, 137, -9)}
    if setup_failed(pre):
        return
    g = Guard()
    runs = {
        "inspect": run(["inspect", "--timeout", "4", vm.pid], timeout=40),
        "repair": run(["repair", "--timeout", "4", vm.pid], timeout=40),
        "device_add": run(["device", "add", "--timeout", "4", vm.pid, "/dev/loop2"],
                          timeout=40),
    }
    rec = run(["reconnect", "--timeout", "4"], timeout=60, prefix=CAPPED)
    emit(pre=pre, runs=runs, reconnect=rec, good_null=vm_stat(good.pid, "/dev/null"),
         good_pid=good.pid, hung_pid=vm.pid, problems=g.problems())


# ============================================================= 7. state files
LVDIR = "/run/libvirt/qemu"


def _status_xml(pid: int, name: str) -> str:
    return (f"<domstatus state='running' reason='booted' pid='{pid}'>"
            f"<domain type='kvm' id='9'><name>{name}</name><memory unit='KiB'>65536</memory>"
            "<devices/></domain></domstatus>\n")


def case_state_files(variant: str) -> None:
    """A state file nsmount reads is hostile: a FIFO, a symlink to /dev/zero, a
    directory, UTF-16, invalid JSON, or a record whose name and content disagree.
    That VM fails with a reason (or a dead pid's record is dropped); the other VM is
    repaired; nothing hangs; no traceback."""
    setup_fake_etc()
    os.makedirs(LVDIR)
    good = start_vm("good", 1)
    invm(good.pid, "rm /dev/null")
    vms = "/run/nsmount/vms"
    obs: dict[str, Any] = {"good_pid": good.pid}
    victim_pid = None
    pre: dict[str, bool] = {}
    if variant in ("fifo-record", "record-devzero", "record-invalid-json"):
        c = start_vm("c", 2)
        victim_pid = c.pid
        path = f"{vms}/{c.pid}.json"
        os.unlink(path)
        if variant == "fifo-record":
            os.mkfifo(path)
            pre["planted"] = stat.S_ISFIFO(os.lstat(path).st_mode)
        elif variant == "record-devzero":
            os.symlink("/dev/zero", path)
            pre["planted"] = os.readlink(path) == "/dev/zero"
        else:
            with open(path, "w") as fh:
                fh.write('{"pid": ' + str(c.pid) + ', "starttime": ')
            pre["planted"] = True
    elif variant in ("fifo-pidfile", "hook-fifo-pidfile"):
        os.mkfifo(f"{LVDIR}/bad.pid")
        pre["planted"] = stat.S_ISFIFO(os.lstat(f"{LVDIR}/bad.pid").st_mode)
    elif variant in ("xml-dir", "xml-utf16"):
        c = start_vm("c", 2)
        victim_pid = c.pid
        with open(f"{LVDIR}/bad.pid", "w") as fh:
            fh.write(f"{c.pid}\n")
        if variant == "xml-dir":
            os.mkdir(f"{LVDIR}/bad.xml")
        else:
            with open(f"{LVDIR}/bad.xml", "wb") as fh:
                fh.write(_status_xml(c.pid, "bad").replace(
                    "<domstatus", "<?xml version='1.0' encoding='UTF-16'?><domstatus", 1)
                    .encode("utf-16"))
        pre["planted"] = True
    elif variant == "record-pid-mismatch":
        # a process nsmount never launched, with a private tmpfs /dev of its own
        e = start_plain(["unshare", "-m", "--propagation", "slave", "sh", "-c",
                         "mount -t tmpfs -o mode=755 tmpfs /dev && exec sleep 1000"])
        victim_pid = e.pid
        with open(f"{vms}/{good.pid}.json") as fh:
            forged = json.load(fh)
        st = read_text(f"/proc/{e.pid}/stat").rsplit(")", 1)[1].split()[19]
        forged["pid"], forged["starttime"] = e.pid, int(st)
        forged["spec"]["name"] = "forged"
        forged["spec"]["devices"] = ["/dev/loop5"]
        with open(f"{vms}/3999999.json", "w") as fh:
            json.dump(forged, fh)
        obs["victim_dev_before"] = sorted(os.listdir(f"/proc/{e.pid}/root/dev"))
        pre["planted"] = not os.path.exists("/proc/3999999")
    obs["victim_pid"] = victim_pid
    if setup_failed(pre):
        return
    g = Guard(LVDIR)
    if variant == "hook-fifo-pidfile":
        xml = _status_xml(1, "bad").split("<domain", 1)[1].rsplit("</domstatus>", 1)[0]
        obs["hook"] = run(["libvirt-hook", "bad", "reconnect", "begin", "-"], timeout=25,
                          prefix=("timeout", "-s", "KILL", "15"), stdin=("<domain" + xml).encode())
    rec = run(["reconnect", "--json"], timeout=40, prefix=CAPPED)
    if variant == "record-pid-mismatch" and victim_pid is not None:
        obs["victim_dev_after"] = sorted(os.listdir(f"/proc/{victim_pid}/root/dev"))
    emit(pre=pre, **obs, reconnect=rec, vms=outcomes(rec),
         good_null=vm_stat(good.pid, "/dev/null"), problems=g.problems())


# ============================================================= 8. output
NL_TARGET = "/etc/y\nFORGED-LINE status: ok"


def case_output_escaping() -> None:
    """Non-UTF-8 names and a newline in a planted symlink target in the VM's /dev:
    text output escaped (\\377, \\012), no traceback, no forged line; --json parses."""
    setup_fake_etc()
    vm = start_vm("x", 3)
    invm(vm.pid, VM_PY + " -I -c \"import os; open(b'/dev/bad\\xffname', 'w').close(); "
         "os.symlink(b'/etc/x\\xff', b'/dev/evil'); "
         f"os.symlink({NL_TARGET!r}, '/dev/nl')\" && rm /dev/null")
    pre = {"planted": invm(vm.pid, "test -L /dev/nl && test -L /dev/evil && "
                           "ls /dev | grep -q 'name$'", check=False).returncode == 0}
    if setup_failed(pre):
        return
    g = Guard()
    env = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "PYTHONUTF8": "0",
           "PYTHONIOENCODING": ""}
    runs = {
        "inspect": run(["inspect", vm.pid], env=env),
        "inspect_json": run(["inspect", "--json", vm.pid], env=env),
        "repair": run(["repair", vm.pid], env=env),
    }
    invm(vm.pid, "rm /dev/null")
    runs["repair_json"] = run(["repair", "--json", vm.pid], env=env)
    emit(pre=pre, runs=runs, null_after=vm_stat(vm.pid, "/dev/null"), problems=g.problems())


# ============================================================= 9. names and paths
def case_long_byid_name(length: int) -> None:
    """A by-id link whose name is ``length`` bytes (242..255 are legal) is hot-added."""
    setup_fake_etc()
    name = ("usb-" + "x" * 300)[:length]
    os.makedirs("/dev/disk/by-id")
    os.symlink("../../loop1", f"/dev/disk/by-id/{name}")
    vm = start_vm("x", 3, devices=[])
    pre = {"host_link": os.path.islink(f"/dev/disk/by-id/{name}")}
    if setup_failed(pre):
        return
    g = Guard()
    r = run(["device", "add", "--json", vm.pid, f"/dev/disk/by-id/{name}"])
    link = invm(vm.pid, f"readlink /dev/disk/by-id/{name}", check=False).stdout.strip()
    emit(pre=pre, add=r, vm_link=link, vm_loop1=vm_stat(vm.pid, "/dev/loop1"),
         problems=g.problems())


def case_path_max_mount(variant: str) -> None:
    """A host mount whose path is longer than PATH_MAX (a tmpfs deep below /dev, or a
    hugetlbfs deep below /mnt), mounted while the VM runs, must not break repair or
    reconnect: the VM's node is fixed and /dev/hugepages (mounted later) replayed."""
    setup_fake_etc()
    vm = start_vm("x", 3, hugepages=True)
    invm(vm.pid, "rm /dev/null")
    old = os.getcwd()
    base = "/dev" if variant == "dev-tmpfs" else "/mnt"
    os.chdir(base)
    depth = len(base)
    for _ in range(17):  # 17 x 251 bytes: beyond PATH_MAX (4096)
        os.mkdir("d" * 250)
        os.chdir("d" * 250)
        depth += 251
    mount_at_cwd("tmpfs" if variant == "dev-tmpfs" else "hugetlbfs")
    os.chdir(old)
    mount_hugetlbfs("/dev/hugepages")
    prefix = base + "/ddd"
    pre = {"long_mount": depth > 4096 and any(
        ln.split(" ")[4].startswith(prefix) for ln in mountinfo_lines())}
    if setup_failed(pre):
        return
    g = Guard()
    rep = run(["repair", "--json", vm.pid])
    null_after_repair = vm_stat(vm.pid, "/dev/null")
    invm(vm.pid, "rm -f /dev/null")
    rec = run(["reconnect", "--json"], prefix=CAPPED)
    emit(pre=pre, repair=rep, null_after_repair=null_after_repair, reconnect=rec,
         vms=outcomes(rec), null_after_reconnect=vm_stat(vm.pid, "/dev/null"),
         hugepages_in_vm=vm_mounts_at(vm.pid, "/dev/hugepages"),
         problems=g.problems(allowed_mounts=["/dev/hugepages"],
                             allowed_paths=["/dev/hugepages", base + "/" + "d" * 250]))


# ============================================================= 10. stacked mounts
def case_stacked_mounts(variant: str) -> None:
    """The VM's tree went private with two mounts of the same host superblock stacked at
    one mount point; repeated repairs converge (no EINVAL loop), one re-link only."""
    setup_fake_etc()
    spec: dict[str, Any] = {}
    if variant == "proc":
        point = "/proc"
    else:
        point = "/mnt/data"
        os.makedirs(point)
        sh(["mount", "-t", "tmpfs", "tmpfs", point])
        spec["mounts"] = [point]
    vm = start_vm("x", 3, **spec)
    invm(vm.pid, f"mount --bind {point} {point} && mount --make-rprivate /")
    before = vm_mounts_at(vm.pid, point)
    pre = {"stacked_private": len(before) >= 2 and all(b == "private" for b in before)}
    if setup_failed(pre):
        return
    g = Guard()
    runs = [run(["repair", "--json", vm.pid]) for _ in range(3)]
    relinks = [sum(1 for r in (x.get("json") or {}).get("results", [])
                   if r.get("action") == "RelinkMount" and r.get("path") == point)
               for x in runs]
    emit(pre=pre, runs=runs, relinks=relinks, after=vm_mounts_at(vm.pid, point),
         before=before, problems=g.problems())
