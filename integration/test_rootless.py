"""Rootless launches (issue 12, item 1): a real unprivileged user runs ``nsmount exec``.

Each test runs in its own sandbox (tests/sandbox.py).  The user is uid/gid 65534
(``setpriv --reuid 65534 --regid 65534 --clear-groups``; no user is added to the real
host's /etc).  nsmount runs under the system ``/usr/bin/python3`` with ``PYTHONPATH``
at the repository: the virtualenv lives under /root, which that user cannot read, and
the rootless path needs nothing outside the standard library.  The user's state dir is
``$XDG_RUNTIME_DIR/nsmount`` (``/run/user/65534``, made by the test as logind would).

======================  ===============================================================
test                    checks
======================  ===============================================================
stand_in                dry run (plan, kvm and an inaccessible loop skipped with the
                        reason, exit 0, nothing changed); a ``sh`` stand-in execs in
                        its own user + mount namespace (both differ from the host's,
                        uid_map is the user's own id), /dev is exactly the minimal set
                        (nodes are binds of the host's: same rdev, usable), ptmx ->
                        pts/ptmx on a new devpts, /dev/shm and the hugetlbfs kept,
                        ``umount /dev`` refused (sealed), the per-domain hugepage dir
                        made in a hugetlbfs the user may write (0700, the user's), the
                        record in the user's runtime dir; a required device the user
                        cannot open: exit 6, one line; the sandbox host's mountinfo and
                        /dev unchanged
qemu                    a real QEMU launched rootless: own user + mount namespace, the
                        minimal /dev, QMP answers, ``blockdev-add`` of the bound loop
                        device works; host mountinfo and /dev unchanged
crash                   SIGKILL right after each rootless step (NSMOUNT_CRASH_AFTER):
                        dies with -9, nothing left on the host (mountinfo, /dev, no
                        record), the next launch works
======================  ===============================================================
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import privileged, run_in_sandbox

pytestmark = privileged

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 not installed")

PRELUDE = r'''
import json, os, stat, subprocess, sys, time
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0], "integration"))
from vmhelpers import comm, dev_tree, mntns, sh, stop, wait_for, write_spec, qemu_argv

UID = 65534
RUNDIR = f"/run/user/{UID}"
STATE = f"{RUNDIR}/nsmount"
AS_USER = ["setpriv", "--reuid", str(UID), "--regid", str(UID), "--clear-groups"]
SYS_PY = "/usr/bin/python3"
os.makedirs(RUNDIR, exist_ok=True)
os.chown(RUNDIR, UID, UID)
os.chmod(RUNDIR, 0o700)
ENV = {k: v for k, v in os.environ.items() if k != "NSMOUNT_STATE_DIR"}
ENV.update(XDG_RUNTIME_DIR=RUNDIR, HOME="/tmp")
os.chmod("/tmp", 0o1777)


def user_nsm(*args, env=None, timeout=60):
    e = dict(ENV, **(env or {}))
    return subprocess.run([*AS_USER, SYS_PY, "-m", "nsmount", *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=timeout,
                          cwd="/tmp")


def start_user(argv, spec, timeout=60, **popen):
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.PIPE)
    p = subprocess.Popen([*AS_USER, SYS_PY, "-m", "nsmount", "exec", "--spec", spec, "--",
                          *argv], text=True, env=ENV, cwd="/tmp", **popen)
    want = os.path.basename(argv[0])[:15]

    def up():
        if p.poll() is not None:
            raise AssertionError(f"nsmount exec failed {p.returncode}: "
                                 f"{p.stderr.read() if p.stderr else ''}")
        return os.path.exists(f"{STATE}/vms/{p.pid}.json") and comm(p.pid) == want

    wait_for(up, f"rootless {argv[0]}", timeout)
    return p


def host_snapshot():
    lines = sorted(l.split(" ", 1)[1] for l in open("/proc/self/mountinfo"))
    return lines, dev_tree("/dev")


def free_loop(img):
    """A free loop device with ``img`` behind it (another sandbox may race for one)."""
    for _ in range(20):
        name = sh(["losetup", "-f"]).stdout.strip()
        n = int(name.removeprefix("/dev/loop"))
        if not os.path.exists(name):
            os.mknod(name, 0o660 | stat.S_IFBLK, os.makedev(7, n))
        if sh(["losetup", name, img], check=False).returncode == 0:
            return name
        time.sleep(0.1)
    raise AssertionError("no free loop device")


def emit(**kw):
    print(json.dumps(kw, default=str))
'''


def sandbox(code: str, **kw: Any) -> Any:
    res = run_in_sandbox(PRELUDE + textwrap.dedent(code), timeout=240, **kw)
    return res.json()


def test_rootless_stand_in() -> None:
    out = sandbox(r'''
        os.chmod("/dev/loop0", 0o666)   # the sandbox host's copy: the user may use it
        os.chmod("/dev/loop1", 0o600)   # ...but not this one
        os.chmod("/dev/hugepages", 0o1777)
        os.makedirs("/dev/disk/by-id", exist_ok=True)
        os.symlink("../../loop0", "/dev/disk/by-id/usb-X")
        spec = "/tmp/vm.toml"
        with open(spec, "w") as fh:
            fh.write('name = "r"\nid = 4\nhugepages = true\n'
                     'devices = ["/dev/disk/by-id/usb-X", '
                     '{path = "/dev/loop1", optional = true}]\n')
        before = host_snapshot()

        r = user_nsm("exec", "--dry-run", "--spec", spec, "--", "sh")
        assert r.returncode == 0, r
        assert "rootless" in r.stdout and "bind host node /dev/loop0" in r.stdout, r.stdout
        assert "skip /dev/kvm: no read-write access for uid 65534" in r.stdout, r.stdout
        assert "skip /dev/loop1: no read-write access" in r.stdout, r.stdout
        assert host_snapshot() == before
        r = user_nsm("exec", "--dry-run", "--json", "--spec", spec, "--", "sh")
        doc = json.loads(r.stdout)
        assert doc["rootless"] is True and doc["actions"][-1]["action"] == "seal-namespace"

        script = ("cat /proc/self/uid_map; echo ---; "
                  "umount -l /dev 2>/dev/null && echo UMOUNTED || echo SEALED; echo ---; "
                  "echo hi > /dev/null && echo NULL-OK; "
                  "head -c 4 /dev/zero | od -An -tx1; echo ---; sleep 1000")
        p = start_user(["sh", "-c", script], spec, stdout=subprocess.PIPE)
        pid = p.pid
        assert mntns(pid) != mntns()
        assert os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        got = [p.stdout.readline().strip() for _ in range(7)]  # up to the last ---
        vm_dev = dev_tree(f"/proc/{pid}/root/dev")
        mi = {l.split()[4]: l for l in open(f"/proc/{pid}/mountinfo")}
        hp = "/dev/hugepages/libvirt/qemu/4-r"
        hp_st = os.stat(hp)
        rec = json.load(open(f"{STATE}/vms/{pid}.json"))
        stop(p)
        emit(uid_map=got[0], lines=got, dev=sorted(vm_dev), nodes={
                 k: list(v) for k, v in vm_dev.items() if v[0] in "cbl"},
             devmount=mi["/dev"], ptsmount=mi["/dev/pts"], hpmount=mi.get("/dev/hugepages"),
             hp=[oct(stat.S_IMODE(hp_st.st_mode)), hp_st.st_uid, hp_st.st_gid],
             rec_userns=rec.get("userns"), rec_pid=rec["pid"], pid=pid,
             unchanged=host_snapshot() == before, loop0=os.stat("/dev/loop0").st_rdev)
    ''', hugetlbfs=["/dev/hugepages"])
    assert out["uid_map"].split() == ["65534", "65534", "1"], out
    lines = out["lines"]
    assert "SEALED" in lines and "UMOUNTED" not in lines, lines
    assert "NULL-OK" in lines and "00 00 00 00" in lines, lines
    assert out["dev"] == ["/dev/disk", "/dev/disk/by-id", "/dev/disk/by-id/usb-X",
                          "/dev/full", "/dev/hugepages", "/dev/loop0", "/dev/mqueue",
                          "/dev/null", "/dev/ptmx", "/dev/pts", "/dev/random", "/dev/shm",
                          "/dev/urandom", "/dev/zero"], out["dev"]
    nodes = out["nodes"]
    assert nodes["/dev/ptmx"][0] == "l" and nodes["/dev/ptmx"][-1] == "pts/ptmx"
    assert nodes["/dev/disk/by-id/usb-X"][-1] == "../../loop0"
    assert nodes["/dev/loop0"][:3] == ["b", 7, 0] and nodes["/dev/null"][:3] == ["c", 1, 3]
    assert " - tmpfs devfs " in out["devmount"] and "size=64k" in out["devmount"]
    assert " - devpts " in out["ptsmount"]
    assert out["hpmount"] and " - hugetlbfs " in out["hpmount"]
    assert out["hp"] == ["0o700", 65534, 65534], out["hp"]
    assert out["rec_pid"] == out["pid"] and out["rec_userns"], out
    assert out["unchanged"], "sandbox host mountinfo or /dev changed"


def test_rootless_errors() -> None:
    out = sandbox(r'''
        os.chmod("/dev/loop1", 0o600)
        with open("/tmp/req.toml", "w") as fh:
            fh.write('name = "r"\ndevices = ["/dev/loop1"]\n')
        before = host_snapshot()
        r1 = user_nsm("exec", "--spec", "/tmp/req.toml", "--", "true")
        # no runtime dir for the record: a clear error, nothing left behind
        r2 = user_nsm("exec", "--", "true", env={"XDG_RUNTIME_DIR": "/nonexistent"})
        r3 = user_nsm("exec", "--domain-xml", "/dev/null", "--", "true")
        emit(r=[[r.returncode, r.stderr] for r in (r1, r2, r3)],
             unchanged=host_snapshot() == before)
    ''')
    (rc1, e1), (rc2, e2), (rc3, e3) = out["r"]
    assert rc1 == 6 and "required device /dev/loop1: no read-write access" in e1, e1
    assert "Traceback" not in e1 + e2 + e3
    assert rc2 != 0 and "launch record" in e2, e2
    assert rc3 == 2 and "defusedxml" in e3, e3
    assert out["unchanged"]


@pytest.mark.qemu
@needs_qemu
def test_rootless_qemu() -> None:
    out = sandbox(r'''
        sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0],
                                        "integration"))
        from qmp import QMP

        with open("/tmp/disk.img", "wb") as fh:
            fh.truncate(16 << 20)
        loop = free_loop("/tmp/disk.img")
        vm = None
        try:
            os.chmod(loop, 0o666)  # the sandbox host's node: this user may use it
            with open("/tmp/vm.toml", "w") as fh:
                fh.write(f'name = "q"\nid = 9\ndevices = ["{loop}"]\n')
            before = host_snapshot()
            vm = start_user(qemu_argv(), "/tmp/vm.toml", timeout=90)
            pid = vm.pid
            with QMP.connect("/tmp/qmp.sock", timeout=60) as q:
                status = q.cmd("query-status")["status"]
                q.cmd("blockdev-add", {"driver": "host_device", "node-name": "d1",
                                       "filename": loop})
                nodes = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
            ids = {"mnt": mntns(pid) != mntns(),
                   "user": os.stat(f"/proc/{pid}/ns/user").st_ino
                   != os.stat("/proc/self/ns/user").st_ino,
                   "uid": [l.split()[1] for l in open(f"/proc/{pid}/status")
                           if l.startswith("Uid:")][0]}
            vm_dev = sorted(dev_tree(f"/proc/{pid}/root/dev"))
            devmount = [l for l in open(f"/proc/{pid}/mountinfo") if l.split()[4] == "/dev"]
            comm_ = comm(pid)
        finally:
            if vm is not None:
                stop(vm)
            sh(["losetup", "-d", loop], check=False)
        emit(status=status, nodes=nodes, ids=ids, dev=vm_dev, devmount=devmount[-1],
             comm=comm_, loop=loop, unchanged=host_snapshot() == before)
    ''')
    assert out["status"] == "prelaunch" and "d1" in out["nodes"], out
    assert out["ids"] == {"mnt": True, "user": True, "uid": "65534"}, out
    assert out["comm"].startswith("qemu-system")
    assert " - tmpfs devfs " in out["devmount"], out
    assert out["loop"] in out["dev"] and "/dev/kvm" not in out["dev"], out["dev"]
    assert set(out["dev"]) <= {"/dev/full", "/dev/null", "/dev/zero", "/dev/random",
                               "/dev/urandom", "/dev/ptmx", "/dev/pts", "/dev/shm",
                               "/dev/mqueue", out["loop"]}, out["dev"]
    assert out["unchanged"], "sandbox host mountinfo or /dev changed"


CRASH = r'''
STEPS = json.loads(os.environ["CRASH_STEPS"])
from nsmount.engine.actions import kebab
BY_KIND = {kebab(s): s for s in STEPS}
os.chmod("/dev/loop0", 0o666)
os.chmod("/dev/hugepages", 0o1777)
os.makedirs("/dev/net", exist_ok=True)
with open("/tmp/vm.toml", "w") as fh:
    fh.write('name = "c"\nhugepages = true\ndevices = ["/dev/loop0"]\n')
r = user_nsm("exec", "--dry-run", "--json", "--spec", "/tmp/vm.toml", "--", "true")
plan = [BY_KIND[a["action"]] for a in json.loads(r.stdout)["actions"]]
runs = {}
if os.environ.get("CRASH_ONLY_PLAN") != "1":
    before = host_snapshot()
    for step in dict.fromkeys(plan):
        errs = []
        r = user_nsm("exec", "--spec", "/tmp/vm.toml", "--", "true",
                     env={"NSMOUNT_CRASH_AFTER": step}, timeout=20)
        if r.returncode != -9:
            errs.append(f"exit {r.returncode}, not -9: {r.stderr[-300:]}")
        if os.path.isdir(f"{STATE}/vms") and os.listdir(f"{STATE}/vms"):
            errs.append(f"record left: {os.listdir(STATE + '/vms')}")
        now = host_snapshot()
        # per-domain hugepage dirs (the pid names them) are made on the host's hugetlbfs
        # on purpose; everything else must be as before
        lines = now[0] == before[0]
        dev = {k: v for k, v in now[1].items() if not k.startswith("/dev/hugepages/")}
        if not lines or dev != before[1]:
            errs.append("sandbox host changed")
        r = user_nsm("exec", "--spec", "/tmp/vm.toml", "--", "sh", "-c", "test -b /dev/loop0")
        if r.returncode != 0:
            errs.append(f"relaunch failed {r.returncode}: {r.stderr[-300:]}")
        for f in os.listdir(f"{STATE}/vms") if os.path.isdir(f"{STATE}/vms") else ():
            os.unlink(f"{STATE}/vms/{f}")
        runs[step] = errs
emit(planned=sorted(set(plan)), runs=runs)
'''


def rootless_crash(only_plan: bool = False) -> dict[str, Any]:
    from nsmount.engine.actions import STEPS

    env = {"CRASH_STEPS": json.dumps([s.__name__ for s in STEPS]),
           "CRASH_ONLY_PLAN": "1" if only_plan else "0"}
    res = run_in_sandbox(PRELUDE + CRASH, env=env, hugetlbfs=["/dev/hugepages"],
                         timeout=240)
    return res.json()  # type: ignore[no-any-return]


def rootless_planned_steps() -> set[str]:
    """The steps a rootless launch plans (for test_crash's reachability check)."""
    return set(rootless_crash(only_plan=True)["planned"])


def test_rootless_crash_and_relaunch() -> None:
    out = rootless_crash()
    assert {"StackDev", "MountDevpts", "BindNode", "SealNamespace"} <= set(out["planned"])
    assert set(out["runs"]) == set(out["planned"]), out
    bad = {k: v for k, v in out["runs"].items() if v}
    assert not bad, json.dumps(bad, indent=1)


def test_rootless_library_launch() -> None:
    """``nsmount.launch()`` by the unprivileged user from its own Python code."""
    out = sandbox(r'''
        code = (
            "import json, os, nsmount\n"
            "vm = nsmount.launch(nsmount.VmSpec(name='lib', domain_id=6), "
            "['sh', '-c', 'test -L /dev/ptmx && test -c /dev/null && ls /dev/pts'])\n"
            "rc = vm.wait(); vm.close()\n"
            "print(json.dumps({'rc': rc, 'rootless': vm.plan.rootless, 'pid': vm.pid}))\n")
        r = subprocess.run([*AS_USER, SYS_PY, "-c", code], capture_output=True, text=True,
                           env=ENV, cwd="/tmp", timeout=60)
        assert r.returncode == 0, r
        doc = json.loads(r.stdout.strip().splitlines()[-1])
        doc["record"] = os.path.exists(f"{STATE}/vms/{doc['pid']}.json")
        emit(**doc)
    ''')
    assert out == {"rc": 0, "rootless": True, "pid": out["pid"], "record": True}, out
