"""``nsmount demo``: a VM built, broken and repaired, inside a throwaway sandbox.

The whole demo runs as PID 1 of a private mount + PID namespace that plays a
hypervisor host (its own tmpfs /dev, / rshared), so the real host's mount table
and /dev are never touched and every process dies with the sandbox.
"""

from __future__ import annotations

import shutil
import sys

DEMO_XML = """<domain type='kvm' id='1'>
  <name>demo</name>
  <uuid>7d3c61c6-1d1e-4c2a-9b55-3f5a1c0de001</uuid>
  <memory unit='MiB'>64</memory>
  <memoryBacking><hugepages/></memoryBacking>
  <devices>
    <disk type='block' device='disk'>
      <source dev='/dev/disk/by-id/virtio-demo'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
</domain>
"""

# Runs inside the sandbox (a fresh interpreter, nsmount importable).
DEMO_SCRIPT = r'''
import json, os, shutil, socket, subprocess, sys, time

PY = [sys.executable, "-m", "nsmount"]
USE_QEMU = os.environ.get("NSMOUNT_DEMO_QEMU") == "1" and shutil.which("qemu-system-x86_64")

def step(title):
    print(f"\n\033[1m== {title}\033[0m" if sys.stdout.isatty() else f"\n== {title}", flush=True)

def run(*args, show=True):
    print("$ " + " ".join(args), flush=True)
    r = subprocess.run(list(args), capture_output=True, text=True)
    if show:
        sys.stdout.write(r.stderr)  # the audit trail (logged before the report)
        sys.stdout.write(r.stdout)
        print(f"(exit {r.returncode})", flush=True)
    return r

def qmp(sock, cmd):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sock)
    f = s.makefile("rw")
    json.loads(f.readline())
    for c in ({"execute": "qmp_capabilities"}, {"execute": cmd}):
        f.write(json.dumps(c) + "\n"); f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                break
    s.close()
    return msg

step("0. the sandbox host: a disk with a by-id symlink")
os.makedirs("/dev/disk/by-id", exist_ok=True)
os.symlink("../../loop0", "/dev/disk/by-id/virtio-demo")
with open("/tmp/demo.xml", "w") as fh:
    fh.write(os.environ["NSMOUNT_DEMO_XML"])
print(open("/tmp/demo.xml").read())

step("1. plan the VM namespace (nsmount exec --dry-run)")
run(*PY, "exec", "--domain-xml", "/tmp/demo.xml", "--dry-run", "--", "qemu")

step("2. launch " + ("QEMU" if USE_QEMU else "a stand-in VM (qemu-system-x86_64 not found)"))
if USE_QEMU:
    cmd = ["qemu-system-x86_64", "-machine", "q35,accel=kvm:tcg", "-m", "64", "-nodefaults",
           "-display", "none", "-S", "-qmp", "unix:/tmp/qmp.sock,server=on,wait=off"]
else:
    cmd = ["sleep", "3600"]
print("$ nsmount exec --domain-xml /tmp/demo.xml -- " + " ".join(cmd))
vm = subprocess.Popen([*PY, "exec", "--domain-xml", "/tmp/demo.xml", "--", *cmd])
for _ in range(100):
    time.sleep(0.05)
    if os.path.exists(f"/run/nsmount/vms/{vm.pid}.json") and (
            not USE_QEMU or os.path.exists("/tmp/qmp.sock")):
        break
pid = str(vm.pid)
print(f"VM pid {pid}")
run(*PY, "inspect", pid)

step("3. break it: host mounts hugetlbfs after start; inside, a node is deleted, "
     "one chmod'ed, /dev/shm unmounted, / made private")
os.makedirs("/dev/hugepages", exist_ok=True)
subprocess.run(["mount", "-t", "hugetlbfs", "hugetlbfs", "/dev/hugepages"], check=True)
subprocess.run(["nsenter", "-t", pid, "-m", "sh", "-c",
                "rm /dev/null; chmod 0600 /dev/urandom; umount /dev/shm; "
                "mount --make-private /"], check=True)
print("host: mount -t hugetlbfs hugetlbfs /dev/hugepages")
print("vm:   rm /dev/null; chmod 0600 /dev/urandom; umount /dev/shm; mount --make-private /")

step("4. nsmount repair --dry-run (shows the drift, changes nothing)")
run(*PY, "repair", "--dry-run", pid)

step("5. nsmount repair")
run(*PY, "repair", pid)

step("6. nsmount repair again: nothing to do")
run(*PY, "repair", pid)

step("7. nsmount reconnect (what a daemon restart runs for every VM)")
run(*PY, "reconnect")

step("8. the host refuses to be a target")
run(*PY, "repair", str(os.getpid()))

if USE_QEMU:
    step("9. QEMU kept running throughout")
    print("QMP query-status:", qmp("/tmp/qmp.sock", "query-status"))
vm.kill()
step("done: the sandbox exits; the host's mounts were never touched")
'''


def run_demo(*, keep_sandbox: bool = False, qemu: bool = True) -> int:
    from ..sandbox.run import run_sandboxed

    env = {"NSMOUNT_DEMO_XML": DEMO_XML,
           "NSMOUNT_DEMO_QEMU": "1" if qemu and shutil.which("qemu-system-x86_64") else "0"}
    res = run_sandboxed(DEMO_SCRIPT, env=env, capture=False)
    sys.stdout.flush()
    return res
