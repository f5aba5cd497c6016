"""The real libvirt QEMU driver (libvirt 9.x): the seed failure and both fixes, and the
same with ``nsmount serve`` (issue 10).

=========================================  ===============================================
test                                       what
=========================================  ===============================================
reconnect_hook_and_manual_reconnect        the scenario below (no service)
serve_hugetlbfs_while_running[rshared,     scenarios/libvirt_serve.py, host ``/`` rshared
private]                                   or private: hugetlbfs mounted while a domain
                                           runs reaches it (and its per-domain dir) with
                                           the service and no command/restart; libvirt
                                           itself refuses the hugepage DIMM until it
                                           restarts (its hugetlbfs list is from daemon
                                           start: that module's docstring has the libvirt
                                           source references); at the restart the hook's
                                           reconnect is served by the service (its log);
                                           the DIMM attach succeeds; remounted at the same
                                           path, a second DIMM attach needs no restart
reconnect_hook_through_the_service         the scenario below, the service running for
                                           the restart: the hook's requests for both
                                           domains served by it (its log)
=========================================  ===============================================

Runs when ``libvirtd`` is installed (``integration/libvirt_setup.sh`` installs the
packages and the users libvirt needs) or ``NSMOUNT_LIBVIRT_TESTS=1``.  Each test takes
5 to 15 s here (limit 90 s).

Everything runs in one sandbox (tests/sandbox.py: private mount + PID namespace):
tmpfs over /etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt, the
sandbox's own /run and /dev, virtlogd and libvirtd started inside; nsmount is made
importable for the hook (libvirt runs hooks with a clean environment) by an overlay
on site-packages with a .pth file, also inside.  Host changes that remain: none; the
global ``vm.nr_hugepages`` and the loop devices are restored/detached in ``finally``
(both inside and, as a fallback, by this test process).  The scenario body is
integration/scenarios/libvirt.py.

Scenario (``docs``: /work/shared/notes/real-libvirt.md):

1. two domains (64 MiB, block disk on a loop device, no NIC, KVM or TCG) started
   *before* hugetlbfs is mounted at /dev/hugepages; nr_hugepages=64; hugetlbfs mounted;
2. (i) without nsmount: libvirtd restarted; QMP ``object-add memory-backend-file``
   with mem-path ``/dev/hugepages/libvirt/qemu/<id>-<name>`` fails in both domains;
3. (iii) ``nsmount reconnect dom2`` by hand: object-add in dom2 succeeds;
4. (ii) ``nsmount install-hook --hooks-dir /etc/libvirt/hooks``, libvirtd restarted:
   the hook (``reconnect begin``) repairs dom1, object-add (id m2) succeeds; the
   hook's line is in the domain log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from harness import hugepages_held, in_sandbox, privileged
from scenarios import libvirt, libvirt_serve

HAVE_LIBVIRT = shutil.which("libvirtd") is not None and shutil.which("virsh") is not None

pytestmark = [
    privileged,
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(not (HAVE_LIBVIRT or os.environ.get("NSMOUNT_LIBVIRT_TESTS") == "1"),
                       reason="libvirtd not installed (integration/libvirt_setup.sh)"),
]

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def _our_loops(tag: str) -> list[str]:
    r = subprocess.run(["losetup", "-a", "-n", "-O", "NAME,BACK-FILE", "--raw"],
                       capture_output=True, text=True, check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if tag in line]


def test_libvirt_reconnect_hook_and_manual_reconnect() -> None:
    _run(libvirt.reconnect_hook_and_manual_reconnect, timeout=180)


def _run(fn: object, *args: object, timeout: float = 120) -> dict[str, object]:
    """``fn(tag, repo, *args)`` in a sandbox; the host's nr_hugepages and loop devices
    are restored/detached here too, whatever happened inside -- all of it under
    :func:`harness.hugepages_held` (the count read and restored while no other test
    changes it)."""
    tag = f"nsmount-lv-{uuid.uuid4().hex[:8]}"
    repo = str(Path(__file__).resolve().parent.parent)
    with hugepages_held():
        old_nr = Path(NR_HUGEPAGES).read_text().strip()
        try:
            res = in_sandbox(fn, tag, repo, *args, timeout=timeout,  # type: ignore[arg-type]
                             check=False)
        finally:
            if Path(NR_HUGEPAGES).read_text().strip() != old_nr:
                Path(NR_HUGEPAGES).write_text(old_nr)
            for loop in _our_loops(tag):
                subprocess.run(["losetup", "-d", loop], check=False)
    out: dict[str, object] = res.json()
    assert res.returncode == 0 and out.get("ok"), res.describe()
    print(json.dumps(out, indent=1))
    return out


@pytest.mark.parametrize("mode", ["rshared", "private"])
def test_libvirt_serve_hugetlbfs_while_running(mode: str) -> None:
    """scenarios/libvirt_serve.py (its docstring says what libvirt itself requires):
    hugetlbfs mounted while a domain runs reaches it through ``nsmount serve`` with no
    command and no daemon restart; libvirt refuses the DIMM hotplug until it restarts
    (its hugetlbfs list is from daemon start); at the restart the hook's reconnect goes
    through the service; the DIMM attach then succeeds; the hugetlbfs mounted again
    reaches the domain and a second DIMM attach succeeds with no restart."""
    _run(libvirt_serve.hugetlbfs_while_running, mode, timeout=90)


def test_libvirt_reconnect_hook_through_the_service() -> None:
    """The restart scenario above (seed failure, manual reconnect, the hook at a daemon
    restart) with ``nsmount serve`` running for the restart: the hook's reconnect
    requests for both domains are served by the service (its log), object-add in nsm1
    succeeds, a final ``nsmount reconnect`` finds nothing to do."""
    out = _run(libvirt.reconnect_hook_and_manual_reconnect, True, timeout=90)
    assert out["service-log"], out
