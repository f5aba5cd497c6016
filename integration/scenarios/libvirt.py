"""The real libvirt QEMU driver (libvirt 9.x), the seed failure and both fixes.

:func:`reconnect_hook_and_manual_reconnect` runs inside one sandbox: tmpfs over
/etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt, virtlogd and
libvirtd started inside, nsmount made importable for the hook by an overlay on
site-packages with a .pth file; it asserts there and prints one JSON line (``ok``).
integration/test_libvirt.py runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from typing import Any

from vmhelpers import PY, mount_hugetlbfs, read_text, sh, wait_for

LOG: list[str] = []
PROCS: dict[str, subprocess.Popen[str]] = {}
URI = "qemu:///system"


def log(*a: object) -> None:
    LOG.append(" ".join(map(str, a)))
    print(*a, file=sys.stderr, flush=True)


def private_libvirt(repo: str) -> None:
    """A private libvirt world: nothing below reaches the host's /etc or /var."""
    for d in ("/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"):
        assert os.path.isdir(d), f"{d} missing: run integration/libvirt_setup.sh"
        sh(["mount", "-t", "tmpfs", "-o", "mode=755", "lvtmp", d])
    sh(["cp", "-a", "/etc/libvirt", "/run/etc-libvirt-orig"])
    sh(["mount", "-t", "tmpfs", "-o", "mode=755", "lvetc", "/etc/libvirt"])
    sh("cp -a /run/etc-libvirt-orig/. /etc/libvirt/")
    with open("/etc/libvirt/qemu.conf", "w") as fh:
        fh.write('user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
                 'security_driver = "none"\ncgroup_controllers = [ ]\n'
                 'namespaces = [ "mount" ]\n')
    with open("/etc/libvirt/libvirtd.conf", "w") as fh:
        fh.write('log_outputs = "1:file:/var/log/libvirt/libvirtd.log"\n'
                 'log_filters = "1:qemu.qemu_namespace 1:qemu.qemu_process 1:util.hook"\n')
    # libvirt runs hooks with a clean environment (no PYTHONPATH): make nsmount importable
    # for this interpreter through a .pth file in an overlay on site-packages (sandbox only)
    sp = sysconfig.get_paths()["purelib"]
    os.makedirs("/run/ovl/up")
    os.makedirs("/run/ovl/work")
    sh(["mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={sp},upperdir=/run/ovl/up,workdir=/run/ovl/work", sp])
    with open(os.path.join(sp, "nsmount-src.pth"), "w") as fh:
        fh.write(repo + "\n")
    assert sh([PY, "-c", "import nsmount"], env={"PATH": os.environ["PATH"]},
              cwd="/").returncode == 0


def start_daemons() -> None:
    if "virtlogd" not in PROCS:
        PROCS["virtlogd"] = subprocess.Popen(["virtlogd"], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, text=True)
    PROCS["libvirtd"] = subprocess.Popen(["libvirtd", "-f", "/etc/libvirt/libvirtd.conf"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if sh(["virsh", "-c", URI, "version"], check=False).returncode == 0:
            return
        if PROCS["libvirtd"].poll() is not None:
            err = PROCS["libvirtd"].stderr
            raise AssertionError(f"libvirtd died: {err.read() if err else ''}")
        time.sleep(0.2)
    raise AssertionError("libvirtd did not answer")


def restart_libvirtd() -> None:
    p = PROCS.pop("libvirtd")
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    start_daemons()


def stop_daemons() -> None:
    for p in reversed(list(PROCS.values())):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(["virsh", "-c", URI, *args], check=check, timeout=60)


def object_add(dom: str, obj_id: str, path: str) -> tuple[int, str]:
    """QMP ``object-add memory-backend-file`` at ``path`` in a domain: (0 ok / 1, reply)."""
    cmd = {"execute": "object-add", "arguments": {
        "qom-type": "memory-backend-file", "id": obj_id, "size": 2097152,
        "mem-path": path, "prealloc": True}}
    r = virsh("qemu-monitor-command", dom, json.dumps(cmd), check=False)
    out = (r.stdout + r.stderr).strip()
    try:  # virsh exits 0 with the QMP error in the reply
        ok = r.returncode == 0 and "return" in json.loads(r.stdout)
    except ValueError:
        ok = False
    return (0 if ok else 1), out


def loop_device(img: str) -> str:
    """A loop device over ``img`` with its node in the sandbox's /dev (loop0-7 only)."""
    with open(img, "wb") as fh:
        fh.truncate(16 * 2 ** 20)
    loop = sh(["losetup", "-f", "--show", img]).stdout.strip()
    if not os.path.exists(loop):
        maj, mi = read_text(f"/sys/class/block/{os.path.basename(loop)}/dev").split(":")
        os.mknod(loop, 0o660 | 0o060000, os.makedev(int(maj), int(mi)))
    return loop


def domain_xml(name: str, dtype: str, disk: str | None, *, dimm_slots: int = 0) -> str:
    """A minimal domain (no disk when ``disk`` is None); with ``dimm_slots`` it can take
    memory DIMMs later (libvirt needs ``maxMemory`` and a NUMA cell for that, QEMU an
    ACPI device)."""
    disk_xml = (f"""<disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>""" if disk else "")
    hotplug = (f"<maxMemory slots='{dimm_slots}' unit='MiB'>1024</maxMemory>\n"
               "  <cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>\n"
               "  <features><acpi/></features>"
               if dimm_slots else "")
    return f"""<domain type='{dtype}'>
  <name>{name}</name>
  {hotplug}
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64')}</emulator>
    {disk_xml}
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def reconnect_hook_and_manual_reconnect(tag: str, repo: str, service: bool = False) -> None:
    """Two domains started before hugetlbfs is mounted; (i) a daemon restart alone does
    not bring it in; (iii) ``nsmount reconnect nsm2`` does, for nsm2 only; (ii) the
    installed hook does it for nsm1 at the next daemon restart.

    With ``service``, ``nsmount serve`` is started before (ii) (started earlier, it would
    bring the mount in by itself and (i) could not be shown): the hook's shell path
    then asks the service (its log names each request and the client's id,
    ``libvirt-hook``; never the Python fallback's ``libvirt-hook-py``).  The service,
    starting, already repairs nsm1 from libvirt's state directory: the hook's answer
    for it may be ``ok``."""
    private_libvirt(repo)
    loops = []
    old_nr = read_text("/proc/sys/vm/nr_hugepages").strip()
    result: dict[str, Any] = {}
    try:
        start_daemons()
        caps = virsh("domcapabilities", "--virttype", "kvm", check=False)
        dtype = "kvm" if caps.returncode == 0 and os.path.exists("/dev/kvm") else "qemu"
        doms = {}
        for n in (1, 2):
            loop = loop_device(f"/tmp/{tag}-{n}.img")
            loops.append(loop)
            name = f"nsm{n}"
            path = f"/run/{name}.xml"
            with open(path, "w") as fh:
                fh.write(domain_xml(name, dtype, loop))
            virsh("create", path)
            dom_id = int(virsh("domid", name).stdout.strip())
            pid = int(read_text(f"/run/libvirt/qemu/{name}.pid"))
            doms[name] = {"id": dom_id, "pid": pid,
                          "mem": f"/dev/hugepages/libvirt/qemu/{dom_id}-{name}"}
        log("domains", doms, "type", dtype)

        with open("/proc/sys/vm/nr_hugepages", "w") as fh:
            fh.write("64")
        mount_hugetlbfs("/dev/hugepages")

        # (i) the seed failure: a daemon restart does not bring the mount in
        restart_libvirtd()
        for name, d in doms.items():
            rc, out = object_add(name, "m1", str(d["mem"]))
            result[f"before-{name}"] = [rc, out]
            assert rc != 0, (name, out)
            assert ("backing store" in out or "No such file" in out), out
            assert not os.path.exists(f"/proc/{d['pid']}/root/dev/hugepages/libvirt")

        # (iii) nsmount reconnect by hand, second domain only
        r = sh([PY, "-m", "nsmount", "reconnect", "nsm2", "--json"], check=False)
        rep = json.loads(r.stdout)
        result["reconnect-nsm2"] = [r.returncode, rep["summary"]]
        assert r.returncode == 1 and rep["vms"][0]["status"] == "repaired", (r.stdout, r.stderr)
        rc, out = object_add("nsm2", "m1b", str(doms["nsm2"]["mem"]))
        result["after-reconnect-nsm2"] = [rc, out]
        assert rc == 0, out
        # and nsm1 is untouched by it: still failing
        rc, out = object_add("nsm1", "m1c", str(doms["nsm1"]["mem"]))
        assert rc != 0, out

        # (ii) the hook, then a daemon restart: libvirt's reconnect runs it for nsm1
        r = sh([PY, "-m", "nsmount", "install-hook", "--hooks-dir", "/etc/libvirt/hooks"])
        result["install-hook"] = r.stdout.strip()
        assert os.access("/etc/libvirt/hooks/qemu.d/50-nsmount", os.X_OK)
        if service:
            from scenarios.serve import LOG, serve

            serve()
            mark = len(read_text(LOG))
        restart_libvirtd()
        if service:
            def served(name: str) -> bool:
                return any(f"request reconnect {name} (pid {doms[name]['pid']})" in ln
                           and "id libvirt-hook:" in ln
                           and (": ok" in ln or ": repaired" in ln)
                           for ln in read_text(LOG)[mark:].splitlines())

            wait_for(lambda: served("nsm1") and served("nsm2"), f"hook requests in {LOG}", 30)
            lines = [ln for ln in read_text(LOG)[mark:].splitlines() if " request " in ln]
            result["service-log"] = lines
            assert not any("libvirt-hook-py" in ln for ln in lines), lines
        rc, out = object_add("nsm1", "m2", str(doms["nsm1"]["mem"]))
        result["after-hook-nsm1"] = [rc, out]
        with open("/var/log/libvirt/libvirtd.log", errors="replace") as fh:
            dlog = fh.read()
        result["hook-log"] = [ln[-200:] for ln in dlog.splitlines()
                              if "nsmount" in ln or "hooks/qemu" in ln][-4:]
        assert rc == 0, (out, dlog[-3000:])
        assert "50-nsmount id=nsm1 op=reconnect subop=begin" in dlog, dlog[-3000:]
        # both VMs still run, reconnect by hand now finds nothing to do for either
        r = sh([PY, "-m", "nsmount", "reconnect", "--json", "--no-scan"], check=False)
        rep = json.loads(r.stdout)
        result["final-reconnect"] = [r.returncode, rep["summary"]]
        assert r.returncode == 0, r.stdout
        result["ok"] = True
    finally:
        for name in ("nsm1", "nsm2"):
            virsh("destroy", name, check=False)
        stop_daemons()
        for loop in loops:
            sh(["losetup", "-d", loop], check=False)
        sh(["umount", "/dev/hugepages"], check=False)
        with open("/proc/sys/vm/nr_hugepages", "w") as fh:
            fh.write(old_nr)
        print(json.dumps(result, default=str))
