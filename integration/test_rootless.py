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

The scenario bodies are in integration/scenarios/rootless.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from harness import in_sandbox, privileged
from scenarios import rootless

pytestmark = privileged

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 not installed")


def run(fn: Callable[..., None], *args: object, hugetlbfs: Sequence[str] = ()
        ) -> dict[str, Any]:
    """The scenario's JSON line (a failure inside the sandbox fails the test)."""
    res = in_sandbox(fn, *args, hugetlbfs=hugetlbfs, timeout=240)
    return res.json()  # type: ignore[no-any-return]


def test_rootless_stand_in() -> None:
    out = run(rootless.stand_in, hugetlbfs=["/dev/hugepages"])
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
    out = run(rootless.errors)
    (rc1, e1), (rc2, e2), (rc3, e3) = out["r"]
    assert rc1 == 6 and "required device /dev/loop1: no read-write access" in e1, e1
    assert "Traceback" not in e1 + e2 + e3
    assert rc2 != 0 and "launch record" in e2, e2
    assert rc3 == 2 and "defusedxml" in e3, e3
    assert out["unchanged"]


@pytest.mark.qemu
@needs_qemu
def test_rootless_qemu() -> None:
    out = run(rootless.qemu)
    assert out["status"] == "prelaunch" and "d1" in out["nodes"], out
    assert out["ids"] == {"mnt": True, "user": True, "uid": "65534"}, out
    assert out["comm"].startswith("qemu-system")
    assert " - tmpfs devfs " in out["devmount"], out
    assert out["loop"] in out["dev"] and "/dev/kvm" not in out["dev"], out["dev"]
    assert set(out["dev"]) <= {"/dev/full", "/dev/null", "/dev/zero", "/dev/random",
                               "/dev/urandom", "/dev/ptmx", "/dev/pts", "/dev/shm",
                               "/dev/mqueue", out["loop"]}, out["dev"]
    assert out["unchanged"], "sandbox host mountinfo or /dev changed"


def rootless_crash(only_plan: bool = False) -> dict[str, Any]:
    from nsmount.engine.actions import STEPS

    return run(rootless.crash_and_relaunch, [s.__name__ for s in STEPS], only_plan,
               hugetlbfs=["/dev/hugepages"])


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
    out = run(rootless.library_launch)
    assert out == {"rc": 0, "rootless": True, "pid": out["pid"], "record": True}, out
