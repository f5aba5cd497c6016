"""The real libvirt QEMU driver (libvirt 9.x) with ``nsmount serve`` running.

Runs inside one sandbox like :mod:`scenarios.libvirt` (whose private libvirt world,
daemons and domains it reuses), with the sandbox host's ``/`` either left rshared (as
systemd leaves it) or made rprivate first (``mode``).  The service is started with
:func:`scenarios.serve.serve` (log in :data:`scenarios.serve.LOG`); the hook is the
installed shell script.  Prints one JSON line with ``ok``; integration/test_libvirt.py
runs it.

What libvirt 9.0 itself requires for a hugepage DIMM hotplug (src/qemu/qemu_conf.c,
qemu_process.c, qemu_hotplug.c), and so what this scenario can show:

* libvirt's list of hugetlbfs mounts (``cfg->hugetlbfs``) is filled once, when the
  QEMU driver loads its configuration at daemon start: found in the host's mount table
  (``virFileFindHugeTLBFS``) or named by ``hugetlbfs_mount`` in qemu.conf, which is
  checked with statfs() then and refuses to start the driver when the path is not a
  hugetlbfs ("not a hugetlbfs mount").  qemu.conf is not re-read on SIGHUP.  So a
  hugetlbfs that did not exist when the daemon started makes ``attach-device`` of a
  hugepage DIMM fail with "hugetlbfs filesystem is not mounted or disabled by
  administrator config" until the daemon restarts, whatever happens in the VM: no
  supported way around it.
* once libvirt knows the mount, the hotplug builds ``<mount>/libvirt/qemu/<id>-<name>``:
  when that directory already exists on the host, libvirt does nothing more
  (``virFileExists``, then return); else it creates it and bind-mounts it into the
  domain's namespace through a mount under /run, which only propagates there when the
  host's ``/`` is shared: with ``/`` private that fails ("Unable to move ... mount to
  ...: Invalid argument").  nsmount creates the directory on the very filesystem the
  host sees, so the hotplug works in both modes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from scenarios.libvirt import (
    PROCS,
    domain_xml,
    loop_device,
    private_libvirt,
    restart_libvirtd,
    start_daemons,
    stop_daemons,
    virsh,
)
from scenarios.serve import LOG, serve, settle, talk
from vmhelpers import (
    HUGETLBFS_MAGIC,
    PY,
    emit,
    mount_hugetlbfs,
    read_text,
    sh,
    statfs_type,
    wait_for,
)

DIMM_XML = """<memory model='dimm'>
  <source><pagesize unit='KiB'>2048</pagesize></source>
  <target><size unit='KiB'>2048</size><node>0</node></target>
</memory>
"""
HOOK = "/etc/libvirt/hooks/qemu.d/50-nsmount"
HP = "/dev/hugepages"


def make_private_host(mode: str) -> None:
    """``private``: the sandbox host's ``/`` (rshared, as systemd leaves it) made
    rprivate, the other kind of hypervisor host libvirt meets."""
    assert mode in ("rshared", "private"), mode
    if mode == "private":
        sh(["mount", "--make-rprivate", "/"])


def kvm_or_tcg() -> str:
    caps = virsh("domcapabilities", "--virttype", "kvm", check=False)
    return "kvm" if caps.returncode == 0 and os.path.exists("/dev/kvm") else "qemu"


def sees(pid: int, path: str, marker: str | None = None) -> bool:
    """QEMU ``pid`` sees a hugetlbfs at ``path`` holding ``marker`` (a file only one
    host mount has) and its per-domain dir, looked at through /proc/PID/root."""
    root = f"/proc/{pid}/root"
    try:
        return (statfs_type(f"{root}{HP}") == HUGETLBFS_MAGIC and os.path.isdir(root + path)
                and (marker is None or os.path.exists(f"{root}{HP}/{marker}")))
    except OSError:
        return False


def service_lines(since: int) -> list[str]:
    """The service log's request lines written after byte ``since``."""
    return [ln for ln in read_text(LOG)[since:].splitlines() if " request " in ln]


def attach_dimm(dom: str) -> tuple[int, str]:
    with open("/run/dimm.xml", "w") as fh:
        fh.write(DIMM_XML)
    r = virsh("attach-device", dom, "/run/dimm.xml", "--live", check=False)
    return r.returncode, (r.stdout + r.stderr).strip()


def dimms(dom: str) -> int:
    return virsh("dumpxml", dom).stdout.count("<memory model='dimm'")


def hugetlbfs_while_running(tag: str, repo: str, mode: str) -> None:
    """One domain (hugepage DIMM slots) started while no hugetlbfs exists, the service
    running, the hook installed:

    1. hugetlbfs mounted on the host: the service brings it, with the per-domain dir,
       into QEMU's namespace; no command run, no daemon restart;
    2. ``attach-device`` of a 2 MiB hugepage DIMM: refused by libvirt itself (its
       hugetlbfs list is from daemon start);
    3. the daemon restarted: libvirt runs the hook (``reconnect begin``), whose shell
       path asks the running service (its log names the request, id ``libvirt-hook``,
       never the Python fallback's ``libvirt-hook-py``); the DIMM attach succeeds;
    4. the hugetlbfs unmounted and mounted again on the host (a new filesystem; libvirt
       knows the path since its start): the domain keeps its equivalent hugetlbfs (same
       page size, nsmount does not stack), the service makes the per-domain dir on the
       host's new one; a second DIMM attach succeeds with no restart.
    """
    make_private_host(mode)
    private_libvirt(repo)
    old_nr = read_text("/proc/sys/vm/nr_hugepages").strip()
    res: dict[str, Any] = {"mode": mode}
    loops: list[str] = []
    name = "nsmhp"
    try:
        if int(old_nr) < 16:
            with open("/proc/sys/vm/nr_hugepages", "w") as fh:
                fh.write("16")
        # libvirt looks for hooks when it starts: installed first
        sh([PY, "-m", "nsmount", "install-hook", "--hooks-dir", "/etc/libvirt/hooks"])
        assert os.access(HOOK, os.X_OK)
        start_daemons()
        serve()
        loops.append(loop_device(f"/tmp/{tag}-hp.img"))
        with open(f"/run/{name}.xml", "w") as fh:
            fh.write(domain_xml(name, kvm_or_tcg(), loops[0], dimm_slots=4))
        mark = len(read_text(LOG))
        virsh("create", f"/run/{name}.xml")
        dom_id = int(virsh("domid", name).stdout.strip())
        pid = int(read_text(f"/run/libvirt/qemu/{name}.pid"))
        per_dom = f"{HP}/libvirt/qemu/{dom_id}-{name}"
        started = service_lines(mark)
        res["started-hook"] = started
        assert any(f"request started {name} " in ln and "id libvirt-hook:" in ln
                   for ln in started), (started, read_text(LOG)[-2000:])
        settle()
        assert not sees(pid, per_dom)

        # 1. mounted while the domain runs: reaches it with no command, no restart
        lvd = PROCS["libvirtd"].pid
        t0 = time.monotonic()
        mount_hugetlbfs(HP)
        open(f"{HP}/.first", "w").close()
        deadline = time.monotonic() + 20
        while not sees(pid, per_dom, ".first"):
            assert time.monotonic() < deadline, read_text(LOG)[-3000:]
            time.sleep(0.01)
        res["visible_after_s"] = round(time.monotonic() - t0, 3)
        assert os.path.isdir(per_dom)  # the same filesystem: the host sees the dir too

        # 2. libvirt's own refusal: its hugetlbfs list is from daemon start
        rc, out = attach_dimm(name)
        res["attach-before-restart"] = [rc, out]
        assert rc != 0 and "hugetlbfs filesystem is not mounted" in out, out
        assert PROCS["libvirtd"].pid == lvd

        # 3. the daemon restarted: the hook's reconnect goes through the service
        mark = len(read_text(LOG))
        restart_libvirtd()

        def reconnected() -> bool:
            return any(f"request reconnect {name} (pid {pid})" in ln
                       and "id libvirt-hook:" in ln and (": ok" in ln or ": repaired" in ln)
                       for ln in service_lines(mark))

        # libvirt reconnects to its domains (and runs the hook) in threads of their own
        wait_for(reconnected, f"the hook's reconnect in the service log: {LOG}", 30)
        lines = service_lines(mark)
        res["reconnect-hook"] = lines
        assert not any("libvirt-hook-py" in ln for ln in lines), lines
        rc, out = attach_dimm(name)
        res["attach-after-restart"] = [rc, out]
        assert rc == 0 and dimms(name) == 1, out

        # 4. the same path mounted again (a new hugetlbfs, libvirt knows the path): the
        # domain keeps the equivalent hugetlbfs it has (same page size: nsmount does not
        # stack on it); the service makes the per-domain dir on the host's new one, all
        # libvirt checks before it would touch the namespace; no restart needed
        lvd = PROCS["libvirtd"].pid
        sh(["umount", HP])
        t0 = time.monotonic()
        mount_hugetlbfs(HP)
        deadline = time.monotonic() + 20
        while not (os.path.isdir(per_dom) and sees(pid, per_dom)):
            assert time.monotonic() < deadline, read_text(LOG)[-3000:]
            time.sleep(0.01)
        res["remount_dir_after_s"] = round(time.monotonic() - t0, 3)
        rc, out = attach_dimm(name)
        res["attach-after-remount"] = [rc, out]
        assert rc == 0 and dimms(name) == 2, out
        assert PROCS["libvirtd"].pid == lvd and PROCS["libvirtd"].poll() is None
        st = talk({"op": "status"})["result"]
        res["requests"] = st["counters"]["requests"]
        assert "Traceback" not in read_text(LOG), read_text(LOG)[-3000:]
        res["ok"] = True
    finally:
        virsh("destroy", name, check=False)
        stop_daemons()
        for loop in loops:
            sh(["losetup", "-d", loop], check=False)
        sh(["umount", HP], check=False)
        with open("/proc/sys/vm/nr_hugepages", "w") as fh:
            fh.write(old_nr)
        emit(**res)
