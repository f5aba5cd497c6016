"""Concurrent repair/reconnect runs over the same VMs converge like a single run.

:func:`concurrent_repair_and_reconnect` runs inside a sandbox and prints one JSON line
(``problems``, ``codes``); integration/test_concurrency.py asserts on it.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
from typing import Any

from vmhelpers import (
    PY,
    emit,
    invm,
    mount_hugetlbfs,
    mountpoints,
    nsm,
    nsm_json,
    start_vm,
)

from .support import Guard, host_byid_link, setup_fake_etc

DAMAGE = "rm /dev/null; chmod 600 /dev/zero; umount /dev/shm; rm /dev/disk/by-id/usb-X"
INTEGRATION = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def new_vm(i: int) -> Any:
    return start_vm(f"vm{i}", i, devices=["/dev/loop0", "/dev/disk/by-id/usb-X"],
                    hugepages=True, library=True)


def state(pid: int, i: int) -> dict[str, Any]:
    """A VM's end state as ``inspect --json`` shows it (its own id and name masked)."""
    rc, o, err = nsm_json("inspect", pid)
    assert rc == 0, (rc, err)
    mounts = sorted((m["target"], m["fstype"], m["propagation"]) for m in o["mounts"])
    dev = json.dumps(o["dev"]).replace(f"{i}-vm{i}", "ID-NAME")
    return {"mounts": mounts, "dev": dev, "drift": o["drift"]}


def repair_loop(seed: int, pids: list[str]) -> int:
    """``nsmount repair PID`` over every pid, in an order of its own; the worst exit."""
    random.Random(seed).shuffle(pids)
    codes = []
    for p in pids:
        r = subprocess.run([sys.executable, "-m", "nsmount", "repair", p],
                           capture_output=True, text=True)
        codes.append(r.returncode)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
    return max(codes)


def concurrent_repair_and_reconnect() -> None:
    """Ten damaged VMs, a hugetlbfs mounted late, then 4 ``reconnect --no-scan`` and 4
    repair loops at once; each VM must end like a control VM repaired by one run."""
    setup_fake_etc()
    host_byid_link()
    vms = [new_vm(i) for i in range(1, 11)]
    for v in vms:
        invm(v.pid, DAMAGE)
    g = Guard()
    mount_hugetlbfs("/dev/hugepages")

    pids = [str(v.pid) for v in vms]
    env = dict(os.environ, PYTHONPATH=f"{INTEGRATION}:{os.environ.get('PYTHONPATH', '')}")
    procs = []
    for k in range(8):
        if k % 2 == 0:
            argv = [PY, "-m", "nsmount", "reconnect", "--no-scan"]
        else:
            argv = [PY, "-m", "scenarios.concurrency", str(k), *pids]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
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
    problems += g.problems(allowed_mounts=["/dev/hugepages"])
    emit(problems=problems, codes=codes)


if __name__ == "__main__":  # one of the concurrent repair loops
    sys.exit(repair_loop(int(sys.argv[1]), sys.argv[2:]))
