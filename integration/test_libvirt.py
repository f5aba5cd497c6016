"""The real libvirt QEMU driver (libvirt 9.x), the seed failure and both fixes.

Runs when ``libvirtd`` is installed (``integration/libvirt_setup.sh`` installs the
packages and the users libvirt needs) or ``NSMOUNT_LIBVIRT_TESTS=1``.  Slow (~1 min).

Everything runs in one sandbox (tests/sandbox.py: private mount + PID namespace):
tmpfs over /etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt, the
sandbox's own /run and /dev, virtlogd and libvirtd started inside; nsmount is made
importable for the hook (libvirt runs hooks with a clean environment) by an overlay
on site-packages with a .pth file, also inside.  Host changes that remain: none; the
global ``vm.nr_hugepages`` and the loop devices are restored/detached in ``finally``
(both inside and, as a fallback, by this test process).

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
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sandbox import privileged, run_in_sandbox

HAVE_LIBVIRT = shutil.which("libvirtd") is not None and shutil.which("virsh") is not None

pytestmark = [
    privileged,
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(not (HAVE_LIBVIRT or os.environ.get("NSMOUNT_LIBVIRT_TESTS") == "1"),
                       reason="libvirtd not installed (integration/libvirt_setup.sh)"),
]

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"

CODE = r'''
import json, os, shutil, signal, subprocess, sys, time
import sysconfig

TAG = os.environ["NSM_LV_TAG"]
PY = sys.executable
LOG = []


def log(*a):
    LOG.append(" ".join(map(str, a)))
    print(*a, file=sys.stderr, flush=True)


def sh(cmd, check=True, timeout=60, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode:
        raise AssertionError(f"{cmd}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


# ---- a private libvirt world: nothing below reaches the host's /etc or /var
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
os.makedirs("/run/ovl/up"); os.makedirs("/run/ovl/work")
sh(["mount", "-t", "overlay", "overlay", "-o",
    f"lowerdir={sp},upperdir=/run/ovl/up,workdir=/run/ovl/work", sp])
with open(os.path.join(sp, "nsmount-src.pth"), "w") as fh:
    fh.write(os.environ["NSM_REPO"] + "\n")
assert sh([PY, "-c", "import nsmount"], env={"PATH": os.environ["PATH"]}, cwd="/").returncode == 0

procs = {}


def start_daemons():
    if "virtlogd" not in procs:
        procs["virtlogd"] = subprocess.Popen(["virtlogd"], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
    procs["libvirtd"] = subprocess.Popen(["libvirtd", "-f", "/etc/libvirt/libvirtd.conf"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if sh(["virsh", "-c", "qemu:///system", "version"], check=False).returncode == 0:
            return
        if procs["libvirtd"].poll() is not None:
            raise AssertionError(f"libvirtd died: {procs['libvirtd'].stderr.read()}")
        time.sleep(0.2)
    raise AssertionError("libvirtd did not answer")


def restart_libvirtd():
    p = procs.pop("libvirtd")
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    start_daemons()


def virsh(*args, check=True):
    return sh(["virsh", "-c", "qemu:///system", *args], check=check)


def object_add(dom, obj_id, path):
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


loops = []
old_nr = open("/proc/sys/vm/nr_hugepages").read().strip()
result = {}
try:
    start_daemons()
    caps = virsh("domcapabilities", "--virttype", "kvm", check=False)
    dtype = "kvm" if caps.returncode == 0 and os.path.exists("/dev/kvm") else "qemu"
    doms = {}
    for n in (1, 2):
        img = f"/tmp/{TAG}-{n}.img"
        with open(img, "wb") as fh:
            fh.truncate(16 * 2 ** 20)
        loop = sh(["losetup", "-f", "--show", img]).stdout.strip()
        loops.append(loop)
        if not os.path.exists(loop):  # the sandbox /dev has loop0-7 only
            st = os.stat(f"/sys/class/block/{os.path.basename(loop)}/dev")
            maj, mi = open(f"/sys/class/block/{os.path.basename(loop)}/dev").read().split(":")
            os.mknod(loop, 0o660 | 0o060000, os.makedev(int(maj), int(mi)))
        name = f"nsm{n}"
        xml = f"""<domain type='{dtype}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>{shutil.which('qemu-system-x86_64')}</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='{loop}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""
        path = f"/run/{name}.xml"
        with open(path, "w") as fh:
            fh.write(xml)
        virsh("create", path)
        dom_id = int(virsh("domid", name).stdout.strip())
        pid = int(open(f"/run/libvirt/qemu/{name}.pid").read())
        doms[name] = {"id": dom_id, "pid": pid,
                      "mem": f"/dev/hugepages/libvirt/qemu/{dom_id}-{name}"}
    log("domains", doms, "type", dtype)

    with open("/proc/sys/vm/nr_hugepages", "w") as fh:
        fh.write("64")
    os.makedirs("/dev/hugepages", exist_ok=True)
    sh(["mount", "-t", "hugetlbfs", "hugetlbfs", "/dev/hugepages"])

    # (i) the seed failure: a daemon restart does not bring the mount in
    restart_libvirtd()
    for name, d in doms.items():
        rc, out = object_add(name, "m1", d["mem"])
        result[f"before-{name}"] = [rc, out]
        assert rc != 0, (name, out)
        assert ("backing store" in out or "No such file" in out), out
        assert not os.path.exists(f"/proc/{d['pid']}/root/dev/hugepages/libvirt")

    # (iii) nsmount reconnect by hand, second domain only
    r = sh([PY, "-m", "nsmount", "reconnect", "nsm2", "--json"], check=False)
    rep = json.loads(r.stdout)
    result["reconnect-nsm2"] = [r.returncode, rep["summary"]]
    assert r.returncode == 1 and rep["vms"][0]["status"] == "repaired", (r.stdout, r.stderr)
    rc, out = object_add("nsm2", "m1b", doms["nsm2"]["mem"])
    result["after-reconnect-nsm2"] = [rc, out]
    assert rc == 0, out
    # and nsm1 is untouched by it: still failing
    rc, out = object_add("nsm1", "m1c", doms["nsm1"]["mem"])
    assert rc != 0, out

    # (ii) the hook, then a daemon restart: libvirt's reconnect runs it for nsm1
    r = sh([PY, "-m", "nsmount", "install-hook", "--hooks-dir", "/etc/libvirt/hooks"])
    result["install-hook"] = r.stdout.strip()
    assert os.access("/etc/libvirt/hooks/qemu.d/50-nsmount", os.X_OK)
    restart_libvirtd()
    rc, out = object_add("nsm1", "m2", doms["nsm1"]["mem"])
    result["after-hook-nsm1"] = [rc, out]
    dlog = open("/var/log/libvirt/libvirtd.log", errors="replace").read()
    result["hook-log"] = [l[-200:] for l in dlog.splitlines()
                          if "nsmount" in l or "hooks/qemu" in l][-4:]
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
        sh(["virsh", "-c", "qemu:///system", "destroy", name], check=False)
    for p in reversed(list(procs.values())):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
    for loop in loops:
        sh(["losetup", "-d", loop], check=False)
    sh(["umount", "/dev/hugepages"], check=False)
    with open("/proc/sys/vm/nr_hugepages", "w") as fh:
        fh.write(old_nr)
    print(json.dumps(result, default=str))
'''


def _our_loops(tag: str) -> list[str]:
    r = subprocess.run(["losetup", "-a", "-n", "-O", "NAME,BACK-FILE", "--raw"],
                       capture_output=True, text=True, check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if tag in line]


def test_libvirt_reconnect_hook_and_manual_reconnect() -> None:
    tag = f"nsmount-lv-{uuid.uuid4().hex[:8]}"
    old_nr = Path(NR_HUGEPAGES).read_text().strip()
    repo = str(Path(__file__).resolve().parent.parent)
    try:
        res = run_in_sandbox(CODE, timeout=180, check=False,
                             env={"NSM_LV_TAG": tag, "NSM_REPO": repo})
    finally:
        if Path(NR_HUGEPAGES).read_text().strip() != old_nr:
            Path(NR_HUGEPAGES).write_text(old_nr)
        for loop in _our_loops(tag):
            subprocess.run(["losetup", "-d", loop], check=False)
    out = res.json()
    assert res.returncode == 0 and out.get("ok"), res.describe()
    print(json.dumps(out, indent=1))
