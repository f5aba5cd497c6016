"""Crash injection: every apply step, killed right after it, then a clean rerun converges.

The step list comes from the code (``nsmount.engine.actions.STEPS``), so a new step is covered
automatically, and a step no scenario plans makes ``test_every_step_is_reachable``
fail, naming it (coverage cannot shrink silently).

Scenarios (each in its own sandbox; every (scenario, step) pair gets a fresh VM):

* ``launch``    ``nsmount exec`` of a spec with a nested node (/dev/net/tun), a by-id
                symlink chain and hugepages, hugetlbfs mounted on the host first;
* ``repair``    ``nsmount repair`` of a VM damaged every way a plan can fix (node
                removed, chmod, dir removed, symlink removed, /dev/shm unmounted,
                hugetlbfs made private, per-domain hugepage dir removed);
* ``reconnect`` ``nsmount reconnect`` after a hugetlbfs is mounted on the host late;
* ``rebuild``   ``nsmount repair --rebuild-dev`` (SwapDev);
* ``remove``    ``nsmount device remove`` (RemoveEntry).

For each step the scenario's dry run plans: run with ``NSMOUNT_CRASH_AFTER=<Step>``,
assert death by SIGKILL (-9), rerun without it (exit 0/1), then assert convergence:
``repair`` and ``reconnect`` of the VM both find nothing to do (exit 0), the nodes are
right, no mount point is stacked in the VM, and the sandbox host's mountinfo is
unchanged except the hugetlbfs mounted on purpose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox import privileged, run_in_sandbox
from test_hostile import PRELUDE

from nsmount.engine.actions import STEPS

pytestmark = privileged

SCENARIOS = ("launch", "repair", "reconnect", "rebuild", "remove")

DRIVER = r'''
import collections
STEPS = json.loads(os.environ["CRASH_STEPS"])
from nsmount.engine.actions import kebab
BY_KIND = {kebab(s): s for s in STEPS}  # JSON names the actions in kebab-case
SCEN = os.environ["CRASH_SCENARIO"]
ONLY_PLAN = os.environ.get("CRASH_ONLY_PLAN") == "1"
os.makedirs("/dev/disk/by-id", exist_ok=True)
if not os.path.lexists("/dev/disk/by-id/usb-X"):
    os.symlink("../../loop1", "/dev/disk/by-id/usb-X")
DEVICES = ["/dev/loop0", "/dev/net/tun", "/dev/disk/by-id/usb-X"]
SPEC = write_spec("/run/crash.toml", name="x", id=3, devices=DEVICES, hugepages=True)
if SCEN != "reconnect" and not os.path.ismount("/dev/hugepages"):
    mount_hugetlbfs("/dev/hugepages")

def damage(pid):
    invm(pid, "chmod 600 /dev/zero; rm /dev/null; rm -rf /dev/net; rm /dev/disk/by-id/usb-X;"
              " umount /dev/shm; mount --make-private /dev/hugepages;"
              " rmdir /dev/hugepages/libvirt/qemu/3-x")

def setup():
    """A VM in the scenario's starting state; returns (pid, argv of the run)."""
    if SCEN == "launch":
        return None, ["exec", "--spec", SPEC, "--", "sleep", "1000"]
    if SCEN == "reconnect" and os.path.ismount("/dev/hugepages"):
        sh(["umount", "/dev/hugepages"])
    vm = start_vm(devices=DEVICES)
    if SCEN == "repair":
        damage(vm.pid)
        return vm.pid, ["repair", vm.pid]
    if SCEN == "reconnect":
        mount_hugetlbfs("/dev/hugepages")
        return vm.pid, ["reconnect", vm.pid]
    if SCEN == "rebuild":
        return vm.pid, ["repair", "--rebuild-dev", vm.pid]
    if SCEN == "remove":
        return vm.pid, ["device", "remove", vm.pid, "/dev/loop0"]

def planned(argv):
    if argv[0] == "exec":
        r = nsm("exec", "--dry-run", "--json", *argv[1:])
        return [BY_KIND[a["action"]] for a in json.loads(r.stdout)["actions"]]
    rc, o, err = nsm_json(*argv[:-1], "--dry-run", argv[-1]) if argv[0] != "device" else \
        nsm_json(*argv[:3], "--dry-run", *argv[3:])
    if "vms" in o:
        o = o["vms"][0]
    return [BY_KIND[a["action"]] for a in o["actions"]]

def converged(pid, removed=()):
    errs = []
    for args in (["repair", pid], ["reconnect", pid], ["repair", pid]):
        r = nsm(*args)
        if r.returncode != 0:  # nothing left to do: 0, not 1
            errs.append(f"{args[0]} after convergence: exit {r.returncode}: {r.stdout}{r.stderr}")
    c = collections.Counter(mountpoints(pid))
    base = collections.Counter(mountpoints())  # the sandbox's own /proc is stacked twice
    errs += [f"stacked: {mp} x{n}" for mp, n in c.items() if n > max(1, base[mp])]
    for path, want in (("/dev/null", "c 1:3"), ("/dev/net/tun", "c 10:200"),
                       ("/dev/loop1", "b 7:1"), ("/dev/loop0", "b 7:0")):
        if path in removed:
            continue
        r = invm(pid, f"stat -c '%F %t:%T' {path}", check=False)
        kind = {"character special file": "c", "block special file": "b"}.get(
            r.stdout.rsplit(" ", 1)[0], r.stdout)
        maj, mnr = (int(x, 16) for x in r.stdout.strip().rsplit(" ", 1)[-1].split(":")) \
            if r.returncode == 0 else (-1, -1)
        if f"{kind} {maj}:{mnr}" != want:
            errs.append(f"{path}: {r.stdout.strip()} {r.stderr.strip()}, want {want}")
    if invm(pid, "test -d /dev/hugepages/libvirt/qemu/3-x && "
                 "grep -q ' /dev/hugepages ' /proc/self/mountinfo", check=False).returncode:
        errs.append("hugetlbfs or per-domain dir missing in the VM")
    return errs

result = {"planned": [], "runs": {}}
pid, argv = setup()
plan = planned(argv)
result["planned"] = sorted(set(plan))
if ONLY_PLAN:
    emit(**result)
    raise SystemExit(0)
for step in [s for s in STEPS if s in plan]:
    if result["runs"]:
        pid, argv = setup()
    before = mountinfo()
    errs = []
    try:
        r = nsm(*argv, env={"NSMOUNT_CRASH_AFTER": step}, timeout=20)
        if r.returncode != -9:
            errs.append(f"crash run exit {r.returncode}, not -9: {r.stderr[-300:]}")
    except subprocess.TimeoutExpired:
        errs.append("crash run did not die (step never applied?)")
    if SCEN == "launch":
        vm = start_vm(devices=DEVICES)
        pid = vm.pid
    else:
        r = nsm(*argv)
        if r.returncode not in (0, 1):
            errs.append(f"rerun exit {r.returncode}: {r.stdout}{r.stderr}")
    errs += converged(pid, removed=("/dev/loop0",) if SCEN == "remove" else ())
    if SCEN == "remove" and invm(pid, "test -e /dev/loop0", check=False).returncode == 0:
        errs.append("/dev/loop0 still there after remove")
    after = mountinfo()
    allowed = {" /dev/hugepages "}
    diff = [l for l in (before ^ after) if not any(a in l for a in allowed)]
    if diff:
        errs.append(f"sandbox mountinfo changed: {sorted(diff)}")
    result["runs"][step] = errs
    os.kill(pid, 9)
emit(**result)
'''


def _run(scenario: str, only_plan: bool = False) -> dict:
    env = {"CRASH_STEPS": json.dumps([s.__name__ for s in STEPS]),
           "CRASH_SCENARIO": scenario, "CRASH_ONLY_PLAN": "1" if only_plan else "0"}
    res = run_in_sandbox(PRELUDE + "\nsetup_fake_etc()\n" + DRIVER, env=env, check=False,
                         timeout=170)
    assert res.returncode == 0, res.describe()
    return res.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crash_and_converge(scenario: str) -> None:
    out = _run(scenario)
    assert out["runs"], f"{scenario}: no step planned: {out}"
    bad = {step: errs for step, errs in out["runs"].items() if errs}
    assert not bad, json.dumps(bad, indent=1)


def test_every_step_is_reachable() -> None:
    """Every step of nsmount.engine.actions.STEPS is planned by at least one scenario."""
    planned: set[str] = set()
    for scenario in SCENARIOS:
        planned |= set(_run(scenario, only_plan=True)["planned"])
    # the rootless launch's steps are crash-tested by integration/test_rootless.py
    from test_rootless import rootless_planned_steps

    planned |= rootless_planned_steps()
    missing = sorted(s.__name__ for s in STEPS if s.__name__ not in planned)
    assert not missing, (f"steps no scenario (launch/repair/reconnect/rebuild/remove, "
                         f"rootless) applies, so crash injection cannot cover them: {missing}")
