"""Face 1 end to end: ``nsmount exec`` builds a QEMU mount namespace with a minimal /dev.

Every test runs in its own sandbox (tests/sandbox.py: a private mount + PID namespace
playing a hypervisor host with a tmpfs /dev of real nodes, ``/`` rshared).  The checks
run inside the sandbox; a failure there is a traceback on the sandbox's stderr, shown by
run_in_sandbox.  The scenario bodies are in integration/scenarios/launch.py.

=====================  ================================================================
test                   checks
=====================  ================================================================
minimal_dev            ``exec --domain-xml`` (id 5, block disk /dev/loop0, hugepages):
                       own mount ns; /dev is a new tmpfs holding exactly the default
                       nodes the host has + /dev/loop0 (same rdev/mode/owner); pts, shm,
                       hugepages still mounted; / is a slave and a later host mount
                       arrives; per-domain hugepage dir (0700); launch record
symlink_chain          /dev/disk/by-id/virtio-x -> ../../loop1 (and a two-hop chain
                       to loop2): every link and the final node appear, nothing else
qemu_hugepages         real QEMU with a memory-backend-file in the per-domain dir:
                       QMP answers, its guest RAM is hugetlb memory mapped from that dir
bad_input[...]         missing device, not a device, dangling link (5); outside /dev,
                       '..', link out of /dev, symlink loop (4);
                       malformed XML / TOML (3), unknown command (7), not root (6):
                       one-line stderr, the sandbox's mount table and /dev unchanged
dry_run_json           ``--dry-run --json`` prints the plan (as root and as nobody) and
                       changes nothing
=====================  ================================================================
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import assert_ok, hugepages_held, in_sandbox, privileged
from scenarios import launch

pytestmark = privileged

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
REPO = Path(__file__).resolve().parent.parent
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@functools.cache
def nobody_cannot_run_nsmount() -> str | None:
    """Why ``setpriv ... python -m nsmount`` cannot work here (None if it can).  Runs
    Python as nobody on the host: it only imports, nothing is mounted."""
    if shutil.which("setpriv") is None:
        return "setpriv not installed"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    try:
        r = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import nsmount.cli.main"], env=env,
                           cwd="/", capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run Python as nobody: {exc}"
    if r.returncode != 0:
        return f"cannot run {sys.executable} as nobody: {r.stderr.strip()[-200:]}"
    return None


def test_minimal_dev() -> None:
    assert_ok(in_sandbox(launch.minimal_dev, hugetlbfs=["/dev/hugepages"]))


def test_symlink_chain() -> None:
    assert_ok(in_sandbox(launch.symlink_chain))


# ----------------------------------------------------------------------------- QEMU
@pytest.fixture
def hugepages_64() -> Iterator[None]:
    """Raise the global vm.nr_hugepages by 64 (2 MiB pages) for the test, then give them
    back; relative, and under :func:`harness.hugepages_held`, so no other test changes
    the count while this one uses it."""
    with hugepages_held():
        try:
            with open(NR_HUGEPAGES) as fh:
                old = int(fh.read())
        except OSError as exc:
            pytest.skip(f"no hugepages: {exc}")
        try:
            with open(NR_HUGEPAGES, "w") as fh:
                fh.write(str(old + 64))
            with open(NR_HUGEPAGES) as fh:
                now = int(fh.read())
            if now < old + 32:
                pytest.skip(f"kernel could not allocate hugepages (nr_hugepages {old} -> "
                            f"{now})")
            yield
        finally:
            with open(NR_HUGEPAGES) as fh:
                cur = int(fh.read())
            with open(NR_HUGEPAGES, "w") as fh:
                fh.write(str(max(old, cur - 64)) if cur >= old else str(old))


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 not installed")
def test_qemu_hugepages(hugepages_64: None) -> None:
    assert_ok(in_sandbox(launch.qemu_hugepages, hugetlbfs=["/dev/hugepages"], timeout=180))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", list(launch.BAD_INPUT))
def test_bad_input(case: str) -> None:
    prefix = AS_NOBODY if case == "not-root" else []
    if prefix and nobody_cannot_run_nsmount():
        pytest.skip(str(nobody_cannot_run_nsmount()))
    assert_ok(in_sandbox(launch.bad_input, case, prefix, hugetlbfs=["/dev/hugepages"]))


# ----------------------------------------------------------------------------- dry run
def test_dry_run_json() -> None:
    prefixes = [[]] if nobody_cannot_run_nsmount() else [[], AS_NOBODY]
    assert_ok(in_sandbox(launch.dry_run_json, prefixes, hugetlbfs=["/dev/hugepages"]))
