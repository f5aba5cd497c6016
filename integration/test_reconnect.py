"""Reconnect at scale and under bad input, in a sandbox playing a hypervisor host.

Stand-in VMs are ``sleep 1000`` processes started with the library (``nsmount.launch``)
from the sandbox's own Python process: one fork each, no CLI start-up, so hundreds start
in seconds.  The scenario bodies are in integration/scenarios/reconnect.py.  hugetlbfs
is mounted on the sandbox host only *after* the VMs started, the situation libvirt never
repairs: the VM's /dev is its own tmpfs, so a hugetlbfs mounted under the host's /dev
later never shows up inside (mountinfo may even list it, on the hidden host /dev copy).

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

from collections.abc import Callable
from typing import Any

import pytest
from harness import ok_json, privileged
from scenarios import reconnect

pytestmark = privileged


def ok(fn: Callable[..., None], *args: object) -> dict[str, Any]:
    return ok_json(fn, *args, timeout=150)


def test_scale_200() -> None:
    ok(reconnect.scale_200)


def test_bad_input() -> None:
    ok(reconnect.bad_input)


def test_crash_mid_run_then_rerun_converges() -> None:
    ok(reconnect.crash_mid_run_then_rerun_converges)


@pytest.mark.parametrize("kind", ["launched", "stacked"])
def test_hidden_mount_is_brought_in(kind: str) -> None:
    out = ok(reconnect.hidden_mount_is_brought_in, kind)
    if kind == "stacked":
        # the point of the case: mountinfo listed it, yet it was not visible
        assert out["listed_before"] >= 1, out["_describe"]
