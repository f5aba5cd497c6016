"""Reconnect at scale and under bad input, in a sandbox playing a hypervisor host.

Stand-in VMs are ``sleep 1000`` processes started with the library
(``nsmount.faces.launcher.launch``) from the sandbox's own Python process: one fork each,
no CLI start-up, so hundreds start in seconds.  hugetlbfs is mounted on the sandbox
host only *after* the VMs started, the situation libvirt never repairs: the VM's /dev
is its own tmpfs, so a hugetlbfs mounted under the host's /dev later never shows up
inside (mountinfo may even list it, on the hidden host /dev copy).

=====================  ===========================================================  ====
case                   what                                                          exit
=====================  ===========================================================  ====
scale_200              200 VMs; hugetlbfs at /dev/hugepages (2M), /dev/hugepages1G   1, 0
                       (1G, or a second 2M at /dev/hugepages2) and /mnt/huge;
                       every VM sees each one (f_type, st_dev = the host's, f_bsize)
                       with its per-domain dir, each exactly once among its visible
                       mounts; rerun: every VM "ok"
bad_input              a VM killed right before the run, a libvirt entry whose       2
                       status XML names another pid than the pid file, a stale pid
                       file: those three failed with reasons, the rest repaired,
                       nothing on the host removed
crash_mid_run          60 VMs, NSMOUNT_CRASH_AFTER=ReplayMount:50 (SIGKILL), then    -9, 1, 0
                       a normal rerun converges; the next rerun is clean
hidden_mount           hugetlbfs mounted at /dev/hugepages after the VM started:     1, 0
                       listed in the VM's mountinfo (hidden) but not visible;
                       reconnect brings it in once, no stacking
=====================  ===========================================================  ====
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import privileged, run_in_sandbox

pytestmark = privileged

#: helpers run inside every sandbox
PRELUDE = r'''
import json, os, signal, stat, subprocess, sys, time
from nsmount.faces.launcher import launch
from nsmount.model.spec import VmSpec
from nsmount.kernel import consts as C, syscalls

PY = sys.executable
HUGETLBFS_MAGIC = 0x958458f6
HAVE_1G = os.path.exists("/sys/kernel/mm/hugepages/hugepages-1048576kB")
MB, GB = 2 ** 20, 2 ** 30


def sh(cmd, check=True):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{cmd}: {r.returncode} {r.stderr}")
    return r


def start_vms(n, first=0):
    """n stand-in VMs (no hugepages wanted), guest<i> with domain id i+1."""
    out = {}
    for i in range(first, first + n):
        vm = launch(VmSpec(name=f"guest{i}", domain_id=i + 1), ["sleep", "1000"])
        out[i] = vm
    # exec done (comm is sleep) for every one
    deadline = time.time() + 30
    for vm in out.values():
        while open(f"/proc/{vm.pid}/comm").read().strip() != "sleep":
            assert time.time() < deadline, "VM did not exec"
            time.sleep(0.005)
    return out


def mount_hugetlbfs(path, pagesize="2M"):
    os.makedirs(path, exist_ok=True)
    sh(["mount", "-t", "hugetlbfs", "-o", f"pagesize={pagesize}", "hugetlbfs", path])


def nsm(*args, env=None, timeout=120):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([PY, "-m", "nsmount", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout)


def reconnect_json(*args, env=None):
    r = nsm("reconnect", "--json", *args, env=env)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON: rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.returncode, data, r.stderr


def _unescape(s):
    return s.encode().decode("unicode_escape") if "\\" in s else s


def visible_mounts(pid):
    """Mount points of the mounts the VM can reach: attached below a reachable,
    uncovered parent or stacked on a reachable one, and not shadowed by a sibling on
    an ancestor path.  A mount stacked on another counts both (so a mount point
    listed twice here is stacked), a mount on a hidden copy of /dev counts not."""
    ms = {}
    with open(f"/proc/{pid}/mountinfo") as fh:
        for line in fh:
            f = line.split(" ")
            ms[int(f[0])] = (int(f[1]), _unescape(f[4]))
    kids = {}
    for mid, (par, mp) in ms.items():
        kids.setdefault(par, []).append(mid)

    def under(child, anc):
        return anc == "/" or child.startswith(anc + "/")

    def covered(mid):
        return any(ms[k][1] == ms[mid][1] for k in kids.get(mid, ()))

    memo = {}

    def reach(mid):
        if mid in memo:
            return memo[mid]
        par, mp = ms[mid]
        if par not in ms or par == mid:
            r = True
        elif any(ms[s][1] != mp and under(mp, ms[s][1]) for s in kids[par] if s != mid):
            r = False                       # a sibling mounted on an ancestor path
        elif mp == ms[par][1]:
            r = reach(par)                  # stacked on its parent's root
        else:
            r = reach(par) and not covered(par)
        memo[mid] = r
        return r

    return [ms[mid][1] for mid in ms if reach(mid)]


def all_mountpoints(pid):
    with open(f"/proc/{pid}/mountinfo") as fh:
        return [_unescape(l.split(" ")[4]) for l in fh]


def statfs_type(path):
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return syscalls.fstatfs(fd)[0]
    finally:
        os.close(fd)


def check_vm(pid, i, mounts):
    """Problems of VM guest<i> with each (mount point, page size) of ``mounts``."""
    probs = []
    vis = visible_mounts(pid)
    for mp, psize in mounts:
        p = f"/proc/{pid}/root{mp}"
        try:
            if statfs_type(p) != HUGETLBFS_MAGIC:
                probs.append(f"{mp}: not a hugetlbfs inside")
                continue
            if os.stat(p).st_dev != os.stat(mp).st_dev:
                probs.append(f"{mp}: st_dev differs from the host's")
            if os.statvfs(p).f_bsize != psize:
                probs.append(f"{mp}: f_bsize {os.statvfs(p).f_bsize} != {psize}")
            if not os.path.isdir(f"{p}/libvirt/qemu/{i + 1}-guest{i}"):
                probs.append(f"{mp}: per-domain dir missing")
        except OSError as exc:
            probs.append(f"{mp}: {exc}")
        n = vis.count(mp)
        if n != 1:
            probs.append(f"{mp}: {n} visible mounts")
    return probs


def emit(**kw):
    print(json.dumps(kw, default=str))
'''


def sandbox(code: str, timeout: float = 150, **kw):
    return run_in_sandbox(PRELUDE + code, timeout=timeout, **kw)


def test_scale_200() -> None:
    res = sandbox("""
vms = start_vms(200)
t_start = time.time()
mounts = [("/dev/hugepages", 2 * MB), ("/mnt/huge", 2 * MB)]
mounts.append(("/dev/hugepages1G", GB) if HAVE_1G else ("/dev/hugepages2", 2 * MB))
for mp, ps in mounts:
    mount_hugetlbfs(mp, "1G" if ps == GB else "2M")
host_mi = open("/proc/self/mountinfo").read()
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
assert open("/proc/self/mountinfo").read() == host_mi
emit(ok=True, first=t1, seconds=rep["seconds"], seconds2=rep2["seconds"])
""")
    out = res.json()
    assert out["ok"], res.describe()


def test_bad_input() -> None:
    res = sandbox("""
vms = start_vms(12)
mount_hugetlbfs("/dev/hugepages")
LV = "/run/libvirt/qemu"
os.makedirs(LV, exist_ok=True)
# a libvirt entry that lies: pid file says one process, the status XML another
liar = subprocess.Popen(["sleep", "1000"])
other = subprocess.Popen(["sleep", "1000"])
with open(f"{LV}/liar.pid", "w") as fh:
    fh.write(f"{liar.pid}\\n")
with open(f"{LV}/liar.xml", "w") as fh:
    fh.write(f"<domstatus state='running' reason='booted' pid='{other.pid}'>"
             f"<domain type='kvm' id='77'><name>liar</name></domain></domstatus>")
# a stale pid file: the process is gone
gone = subprocess.Popen(["true"])
gone.wait()
with open(f"{LV}/stale.pid", "w") as fh:
    fh.write(f"{gone.pid}\\n")
# a VM that exits right before the run (killed and reaped)
victim = vms[5]
os.kill(victim.pid, signal.SIGKILL)
victim.wait()

def listing():
    out = set()
    for root in ("/run/nsmount", "/run/libvirt", "/dev"):
        for dp, dns, fns in os.walk(root):
            dns[:] = [d for d in dns if d != "hugepages"]
            out.update(os.path.join(dp, n) for n in dns + fns)
    return out
before = listing()
mi_before = open("/proc/self/mountinfo").read()

rc, rep, err = reconnect_json()
assert rc == 2, (rc, rep["summary"], err[-2000:])
by = {}
for o in rep["vms"]:
    by.setdefault(o["name"], []).append(o)
failed = {o["name"]: o.get("error", "") for o in rep["vms"] if o["status"] == "failed"}
# guest5 exited: its record (and lock) are dropped, it is not a failure
assert set(failed) == {"liar", "stale"}, rep["vms"]
assert "guest5" not in by, by.get("guest5")
assert not os.path.exists(f"/run/nsmount/vms/{victim.pid}.json")
assert all(failed.values()), failed                   # every failure has a reason
assert str(other.pid) in failed["liar"] and str(liar.pid) in failed["liar"], failed
assert str(gone.pid) in failed["stale"] or "exit" in failed["stale"].lower() \\
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
assert open("/proc/self/mountinfo").read() == mi_before
assert liar.poll() is None and other.poll() is None
emit(ok=True, failed=failed)
""")
    out = res.json()
    assert out["ok"], res.describe()


def test_crash_mid_run_then_rerun_converges() -> None:
    res = sandbox("""
N = 60
vms = start_vms(N)
mounts = [("/dev/hugepages", 2 * MB)]
mount_hugetlbfs("/dev/hugepages")
r = nsm("reconnect", "--json", env={"NSMOUNT_CRASH_AFTER": "ReplayMount:50"})
assert r.returncode == -9, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
# some VMs were done, not all
done = sum(1 for i, vm in vms.items() if not check_vm(vm.pid, i, mounts))
assert 0 < done < N, done
rc, rep, err = reconnect_json()
assert rc == 1, (rc, rep["summary"], err[-2000:])
assert rep["summary"]["failed"] == 0, rep["summary"]
bad = {i: p for i, vm in vms.items() if (p := check_vm(vm.pid, i, mounts))}
assert not bad, bad
rc2, rep2, err2 = reconnect_json()
assert rc2 == 0, (rc2, rep2["summary"], [o for o in rep2["vms"] if o["status"] != "ok"][:3])
emit(ok=True, done_before_crash=done, summary=rep["summary"])
""")
    out = res.json()
    assert out["ok"], res.describe()


STACKED_VM = r"""
def start_stacked_vm(i=0):
    # A VM whose private /dev tmpfs sits *on top of* a slave copy of the host's /dev
    # (a naive manager: unshare + mount, no detach).  Host mounts under /dev propagate
    # into the hidden copy: listed in the VM's mountinfo, not reachable.  nsmount gets a
    # launch record for it, as if it had started it.
    from nsmount.state import record
    from nsmount.state.target import starttime
    p = subprocess.Popen(["unshare", "-m", "--propagation", "slave", "sh", "-c",
                          "mount -t tmpfs -o mode=755,size=64k devfs /dev && "
                          "exec sleep 1000"])
    deadline = time.time() + 10
    while open(f"/proc/{p.pid}/comm").read().strip() != "sleep":
        assert time.time() < deadline and p.poll() is None, "stacked VM did not start"
        time.sleep(0.005)
    spec = VmSpec(name=f"guest{i}", domain_id=i + 1, source="record")
    record.write(record.Record(p.pid, starttime(p.pid), spec, ()))
    return p
"""


@pytest.mark.parametrize("kind", ["launched", "stacked"])
def test_hidden_mount_is_brought_in(kind: str) -> None:
    res = sandbox(STACKED_VM + f"KIND = {kind!r}\n" + """
if KIND == "launched":
    pid = start_vms(1)[0].pid
else:
    pid = start_stacked_vm().pid
mount_hugetlbfs("/dev/hugepages")
listed = all_mountpoints(pid).count("/dev/hugepages")
p = f"/proc/{pid}/root/dev/hugepages"
assert not os.path.exists(p) or statfs_type(p) != HUGETLBFS_MAGIC
assert visible_mounts(pid).count("/dev/hugepages") == 0, visible_mounts(pid)
rc, rep, err = reconnect_json(pid)
o = rep["vms"][0]
assert rc == 1 and o["status"] == "repaired", (rc, o, err)
assert any(a["action"] == "replay-mount" and a["path"] == "/dev/hugepages"
           for a in o["actions"]), o["actions"]
_p = check_vm(pid, 0, [("/dev/hugepages", 2 * MB)])
assert _p == [], (_p, open(f"/proc/{pid}/mountinfo").read(), o["actions"])
listed_after = all_mountpoints(pid).count("/dev/hugepages")
assert listed_after == listed + 1, (listed, listed_after)
rc2, rep2, _ = reconnect_json(pid)
assert rc2 == 0 and rep2["vms"][0]["status"] == "ok", rep2
_p = check_vm(pid, 0, [("/dev/hugepages", 2 * MB)])
assert _p == [], (_p, open(f"/proc/{pid}/mountinfo").read(), o["actions"])
assert all_mountpoints(pid).count("/dev/hugepages") == listed_after
# the checker itself sees stacking
sh(["nsenter", "-t", str(pid), "-m", "mount", "--bind", "/dev/hugepages", "/dev/hugepages"])
assert check_vm(pid, 0, [("/dev/hugepages", 2 * MB)]) == ["/dev/hugepages: 2 visible mounts"]
emit(ok=True, listed_before=listed)
""")
    out = res.json()
    assert out["ok"], res.describe()
    if kind == "stacked":
        # the point of the case: mountinfo listed it, yet it was not visible
        assert out["listed_before"] >= 1, res.describe()
