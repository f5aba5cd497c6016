"""Concurrent repair/reconnect runs over the same VMs converge like a single run.

Ten stand-in VMs (``nsmount.faces.launcher.launch``) are damaged (node removed, node
chmodded, /dev/shm unmounted, a by-id symlink removed) and a hugetlbfs is mounted on
the host late.  Then 8 runs start at once: 4 ``reconnect --no-scan`` and 4 loops of
``repair PID`` over all ten VMs in different orders.  Expected: exit codes only 0/1,
no error or failure, no warning other than "busy, waited for another nsmount",
every mount point exactly once per VM, and each VM's end state (``inspect --json``:
/dev listing, mounts, drift) equal to that of a control VM damaged the same way and
repaired by one single run; a final reconnect finds nothing to do.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox import privileged, run_in_sandbox
from test_hostile import PRELUDE

pytestmark = privileged

CODE = r'''
import collections, random
from nsmount.faces.launcher import launch
from nsmount.model.spec import VmSpec

os.makedirs("/dev/disk/by-id"); os.symlink("../../loop1", "/dev/disk/by-id/usb-X")

def new_vm(i):
    spec = VmSpec(name=f"vm{i}", domain_id=i, hugepages=(0,)).with_devices(
        ["/dev/loop0", "/dev/disk/by-id/usb-X"])
    return launch(spec, ["sleep", "1000"])

DAMAGE = ("rm /dev/null; chmod 600 /dev/zero; umount /dev/shm; rm /dev/disk/by-id/usb-X")

def state(pid, i):
    rc, o, err = nsm_json("inspect", pid)
    assert rc == 0, (rc, err)
    mounts = sorted((m["target"], m["fstype"], m["propagation"]) for m in o["mounts"])
    dev = json.dumps(o["dev"]).replace(f"{i}-vm{i}", "ID-NAME")
    return {"mounts": mounts, "dev": dev, "drift": o["drift"]}

vms = [new_vm(i) for i in range(1, 11)]
for v in vms:
    invm(v.pid, DAMAGE)
g = Guard()
mount_hugetlbfs("/dev/hugepages")

pids = [v.pid for v in vms]
script = ("import subprocess, sys, random\n"
          "pids = sys.argv[2:]; random.Random(int(sys.argv[1])).shuffle(pids)\n"
          "codes = []\n"
          "for p in pids:\n"
          "    r = subprocess.run([sys.executable, '-m', 'nsmount', 'repair', p],"
          " capture_output=True, text=True)\n"
          "    codes.append(r.returncode); sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
          "sys.exit(max(codes))\n")
procs = []
for k in range(8):
    if k % 2 == 0:
        argv = [PY, "-m", "nsmount", "reconnect", "--no-scan"]
    else:
        argv = [PY, "-c", script, str(k), *map(str, pids)]
    procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
problems = []
codes = []
for p in procs:
    out, err = p.communicate(timeout=120)
    codes.append(p.returncode)
    if p.returncode not in (0, 1):
        problems.append(f"exit {p.returncode}: {out[-500:]} {err[-500:]}")
    for line in (out + err).splitlines():
        low = line.lower()
        if "warning" in low and "busy, waited" not in low:
            problems.append(f"unexpected warning: {line}")
        elif any(w in low for w in ("error", "fail ", "traceback")) or \
                line.lstrip().startswith(("failed", "FAIL")):
            if " 0 failed" not in line:
                problems.append(f"unexpected error: {line}")

# control: the same damage, one single run
ctl = new_vm(99)
invm(ctl.pid, DAMAGE)
r = nsm("reconnect", ctl.pid)
assert r.returncode == 1, r
want = state(ctl.pid, 99)
assert want["drift"] == [], want
for i, v in enumerate(vms, 1):
    got = state(v.pid, i)
    if got != want:
        problems.append(f"vm{i}: end state differs from a single run: {got} != {want}")
    c = collections.Counter(mountpoints(v.pid))
    base = collections.Counter(mountpoints())
    problems += [f"vm{i}: stacked {mp} x{n}" for mp, n in c.items() if n > max(1, base[mp])]
r = nsm("reconnect", "--no-scan")
if r.returncode != 0:
    problems.append(f"final reconnect: {r.returncode} {r.stdout}")
problems += g.check(["/dev/hugepages"])
emit(problems=problems, codes=codes)
'''


def test_concurrent_repair_and_reconnect() -> None:
    res = run_in_sandbox(PRELUDE + "\nsetup_fake_etc()\n" + CODE, check=False, timeout=170)
    assert res.returncode == 0, res.describe()
    out = res.json()
    assert set(out["codes"]) <= {0, 1}, out
    assert out["problems"] == [], "\n".join(out["problems"])
