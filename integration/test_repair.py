"""Face 2 end to end: inspect, repair, hotplug, run-in and propagation on running VMs.

Every test runs in its own sandbox (tests/sandbox.py): a private mount + PID namespace
playing a hypervisor host (tmpfs /dev with real nodes, / rshared).  VMs are stand-ins
(``nsmount exec --spec F -- sleep 1000``) or a real QEMU (``-S``, QMP on a unix socket
in the sandbox's /tmp).  The assertions run inside the sandbox (the scenario bodies are
in integration/scenarios/repair.py); a failure there is a traceback in the sandbox's
stderr, shown by run_in_sandbox.

====================  =================================================================
test                  checks
====================  =================================================================
damage_cycle          rm /dev/null, chmod 600 /dev/zero, umount /dev/shm, / private:
                      inspect --json lists each drift; repair --dry-run changes nothing
                      (VM mountinfo + /dev listing); repair exits 1 and fixes each;
                      next repair exits 0 with no actions
qemu_damage_cycle     the same on a real QEMU; QMP query-status answers before, after
                      the damage and after the repair
qemu_hotplug          loop device: blockdev-add fails before ``device add``, works
                      after; record updated (a deleted hotplugged node is recreated by
                      repair); ``device remove`` unlinks it in the VM only, repair does
                      not bring it back; ``device remove /dev/null`` refused
bad_targets           own pid / PID 1 (10), nonexistent (9), exits while waiting for the
                      VM lock (9), non-QEMU without record (11, --spec works), unknown
                      domain (8), malformed status XML (3), not a device (5), '..' (4):
                      one-line stderr, no traceback, VM and sandbox /dev unchanged
planted_symlinks      /dev/shm -> /etc and /dev/zero -> /etc/passwd in the VM (fake
                      /etc bound over the sandbox's): never followed, reported, fixed
rebuild_dev           ``unshare -m`` stand-in on the sandbox's full /dev: --rebuild-dev
                      swaps in a minimal tmpfs, pts/shm kept, fd 3 on the old /dev/null
                      keeps working
run_in                run-in shows the VM's mountinfo; host pid refused (10)
propagation           --check ok; /dev made private: --check 1, --fix --dry-run changes
                      nothing, --fix makes it shared
====================  =================================================================
"""

from __future__ import annotations

import shutil

import pytest
from harness import assert_ok, in_sandbox, privileged
from scenarios import repair

pytestmark = privileged

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 not installed")


def test_damage_cycle() -> None:
    assert_ok(in_sandbox(repair.damage_cycle, hugetlbfs=["/dev/hugepages"]))


@pytest.mark.qemu
@needs_qemu
def test_qemu_damage_cycle() -> None:
    assert_ok(in_sandbox(repair.qemu_damage_cycle))


@pytest.mark.qemu
@needs_qemu
def test_qemu_hotplug_loop_device() -> None:
    assert_ok(in_sandbox(repair.qemu_hotplug_loop_device))


def test_bad_targets() -> None:
    assert_ok(in_sandbox(repair.bad_targets))


def test_planted_symlinks() -> None:
    assert_ok(in_sandbox(repair.planted_symlinks, hugetlbfs=["/dev/hugepages"]))


def test_rebuild_dev_keeps_open_fds() -> None:
    assert_ok(in_sandbox(repair.rebuild_dev_keeps_open_fds))


def test_run_in() -> None:
    assert_ok(in_sandbox(repair.run_in))


def test_propagation() -> None:
    assert_ok(in_sandbox(repair.propagation))
