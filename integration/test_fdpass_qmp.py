"""Handing a device to a running QEMU as an fd (issue 12, item 3): QMP ``add-fd``.

Each test runs in its own sandbox with a real QEMU (``-S``) that has two QMP sockets:
one for the test, one for nsmount (QEMU serves one client per socket).  A loop device
with a sparse file behind it is the disk.

=================  ====================================================================
test               checks
=================  ====================================================================
root_vm            a VM launched by ``nsmount exec`` without the loop node:
                   ``blockdev-add`` of ``/dev/fdset/0`` fails first; ``device add
                   --fd-to-qmp`` prints ``/dev/fdset/N`` (exit 0), ``blockdev-add``
                   with it works while the VM's /dev still has no loop node;
                   ``--read-only --json``; ``--dry-run`` passes nothing; refused: the
                   socket of another pid (8), not a device (5), outside /dev or '..'
                   (4); one line on stderr, no traceback
rootless_vm        a QEMU launched rootless by uid 65534, the loop node 0600 root (the
                   user cannot open it): root hands it over with the library call
                   ``fdpass.pass_device``; ``blockdev-add`` works inside the user's VM
=================  ====================================================================

The scenario bodies are in integration/scenarios/fdpass.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pytest
from harness import in_sandbox, privileged
from scenarios import fdpass

pytestmark = [privileged, pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                 reason="qemu-system-x86_64 not installed")]


def run(fn: Callable[[], None]) -> Any:
    """The scenario's JSON line (a failure inside the sandbox fails the test)."""
    return in_sandbox(fn, timeout=240).json()


def test_fd_to_qmp_root_vm() -> None:
    out = run(fdpass.root_vm)
    assert "fdset" in out["before"] or "No such file" in out["before"], out["before"]
    assert out["dry"][0] == 0 and "would pass" in out["dry"][1] and out["after_dry"], out
    rc, stdout, stderr = out["add"]
    assert rc == 0 and stdout.strip().startswith("/dev/fdset/"), out["add"]
    assert len(stdout.strip().splitlines()) == 1
    assert "action=pass-fd" in stderr
    assert out["blockdev"] == {"return": {}}, out["blockdev"]
    rc, doc = out["ro"]
    assert rc == 0 and doc["fds"][0]["read_only"] is True, doc
    assert doc["fds"][0]["node"] == out["loop"] and doc["version"] == 1
    assert out["ro_blockdev"] == {"return": {}}, out
    assert "error" in out["rw_on_ro"], out  # a read-only fd never serves a writer
    assert {"d1", "d2"} <= set(out["nodes"]), out["nodes"]
    assert out["vm_has_loop"] is False  # QEMU never needed the node
    errs = out["errs"]
    assert "belongs to pid" in errs["other-pid"], errs
    assert "not a device" in errs["not-a-device"], errs
    assert "outside /dev" in errs["outside"] or "not under /dev" in errs["outside"], errs
    assert errs["spec"][0] == 64, errs
    assert out["status"] == "prelaunch"


def test_fd_to_qmp_rootless_vm() -> None:
    out = run(fdpass.rootless_vm)
    assert out["vm_has_loop"] is False and out["before"] is True, out
    assert out["dev_fd_closed"] and out["blockdev"] == {"return": {}}, out
    assert "d1" in out["nodes"]
