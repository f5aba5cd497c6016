"""Crash injection: every apply step, killed right after it, then a clean rerun converges.

:func:`crash_scenario` runs inside a sandbox and prints one JSON line: the steps the
scenario's dry run plans and, per step, what was wrong after the crash and the rerun
(an empty list when it converged).  integration/test_crash.py asserts on it.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess

from nsmount.engine.actions import kebab
from vmhelpers import (
    emit,
    invm,
    mount_hugetlbfs,
    mountinfo_lines,
    mountpoints,
    nsm,
    nsm_json,
    sh,
    start_vm,
    write_spec,
)

from .support import host_byid_link, setup_fake_etc

SCENARIOS = ("launch", "repair", "reconnect", "rebuild", "remove")
DEVICES = ["/dev/loop0", "/dev/net/tun", "/dev/disk/by-id/usb-X"]
SPEC = "/run/crash.toml"


def damage(pid: int) -> None:
    invm(pid, "chmod 600 /dev/zero; rm /dev/null; rm -rf /dev/net; rm /dev/disk/by-id/usb-X;"
              " umount /dev/shm; mount --make-private /dev/hugepages;"
              " rmdir /dev/hugepages/libvirt/qemu/3-x")


def setup(scen: str) -> tuple[int | None, list[object]]:
    """A VM in the scenario's starting state; returns (pid, argv of the run)."""
    if scen == "launch":
        return None, ["exec", "--spec", SPEC, "--", "sleep", "1000"]
    if scen == "reconnect" and os.path.ismount("/dev/hugepages"):
        sh(["umount", "/dev/hugepages"])
    vm = start_vm(devices=DEVICES, hugepages=True)
    if scen == "repair":
        damage(vm.pid)
        return vm.pid, ["repair", vm.pid]
    if scen == "reconnect":
        mount_hugetlbfs("/dev/hugepages")
        return vm.pid, ["reconnect", vm.pid]
    if scen == "rebuild":
        return vm.pid, ["repair", "--rebuild-dev", vm.pid]
    assert scen == "remove", scen
    return vm.pid, ["device", "remove", vm.pid, "/dev/loop0"]


def planned(argv: list[object], by_kind: dict[str, str], user: int | None = None) -> list[str]:
    """The steps the run's dry run plans (``user``: an ``exec`` run by that uid, rootless)."""
    if argv[0] == "exec":
        r = nsm("exec", "--dry-run", "--json", *argv[1:], user=user)
        return [by_kind[a["action"]] for a in json.loads(r.stdout)["actions"]]
    _, o, _ = nsm_json(*argv[:-1], "--dry-run", argv[-1]) if argv[0] != "device" else \
        nsm_json(*argv[:3], "--dry-run", *argv[3:])
    if "vms" in o:
        o = o["vms"][0]
    return [by_kind[a["action"]] for a in o["actions"]]


def converged(pid: int, removed: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with the VM: nothing left to do for repair and reconnect, the nodes
    right, no mount point stacked, hugetlbfs and the per-domain dir there."""
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


def crash_scenario(scen: str, steps: list[str], only_plan: bool = False) -> None:
    """For each of ``steps`` the scenario's dry run plans (in that order): a fresh VM,
    the run with ``NSMOUNT_CRASH_AFTER=<step>`` (must die of SIGKILL), a rerun, then
    :func:`converged`; the sandbox's mount table unchanged but for the hugetlbfs."""
    setup_fake_etc()
    by_kind = {kebab(s): s for s in steps}  # JSON names the actions in kebab-case
    host_byid_link()
    write_spec(SPEC, name="x", id=3, devices=DEVICES, hugepages=True)
    if scen != "reconnect" and not os.path.ismount("/dev/hugepages"):
        mount_hugetlbfs("/dev/hugepages")

    runs: dict[str, list[str]] = {}
    pid, argv = setup(scen)
    plan = planned(argv, by_kind)
    if only_plan:
        emit(planned=sorted(set(plan)), runs=runs)
        return
    for step in [s for s in steps if s in plan]:
        if runs:
            pid, argv = setup(scen)
        before = set(mountinfo_lines())
        errs = []
        try:
            r = nsm(*argv, env={"NSMOUNT_CRASH_AFTER": step}, timeout=20)
            if r.returncode != -9:
                errs.append(f"crash run exit {r.returncode}, not -9: {r.stderr[-300:]}")
        except subprocess.TimeoutExpired:
            errs.append("crash run did not die (step never applied?)")
        if scen == "launch":
            pid = start_vm(devices=DEVICES, hugepages=True).pid
        else:
            r = nsm(*argv)
            if r.returncode not in (0, 1):
                errs.append(f"rerun exit {r.returncode}: {r.stdout}{r.stderr}")
        assert pid is not None
        errs += converged(pid, removed=("/dev/loop0",) if scen == "remove" else ())
        if scen == "remove" and invm(pid, "test -e /dev/loop0", check=False).returncode == 0:
            errs.append("/dev/loop0 still there after remove")
        after = set(mountinfo_lines())
        allowed = {" /dev/hugepages "}
        diff = [ln for ln in (before ^ after) if not any(a in ln for a in allowed)]
        if diff:
            errs.append(f"sandbox mountinfo changed: {sorted(diff)}")
        runs[step] = errs
        os.kill(pid, 9)
    emit(planned=sorted(set(plan)), runs=runs)
