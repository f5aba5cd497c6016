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
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox import privileged, run_in_sandbox
from test_rootless import PRELUDE

pytestmark = [privileged, pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                 reason="qemu-system-x86_64 not installed")]

MORE = r'''
from qmp import QMP
from vmhelpers import nsm, one_line_error, start_exec

NSM_SOCK = "/tmp/nsm.sock"


def argv():
    return qemu_argv("-qmp", f"unix:{NSM_SOCK},server=on,wait=off")


def blk(name, path, **kw):
    return {"driver": "host_device", "node-name": name, "filename": path, **kw}
'''


def sandbox(code: str) -> Any:
    return run_in_sandbox(PRELUDE + MORE + textwrap.dedent(code), timeout=240).json()


def test_fd_to_qmp_root_vm() -> None:
    out = sandbox(r'''
        with open("/tmp/disk.img", "wb") as fh:
            fh.truncate(16 << 20)
        loop = free_loop("/tmp/disk.img")
        vm = None
        res = {}
        try:
            with open("/tmp/vm.toml", "w") as fh:
                fh.write('name = "f"\nid = 2\n')
            vm = start_exec(argv(), spec="/tmp/vm.toml", timeout=90)
            pid = vm.pid
            with QMP.connect("/tmp/qmp.sock", timeout=60) as q:
                r = q.execute("blockdev-add", blk("d0", "/dev/fdset/0"))
                res["before"] = r.get("error", {}).get("desc", "")
                r = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, "--dry-run", pid, loop)
                res["dry"] = [r.returncode, r.stdout]
                r = q.execute("blockdev-add", blk("d0", "/dev/fdset/0"))
                res["after_dry"] = "error" in r
                r = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, pid, loop)
                res["add"] = [r.returncode, r.stdout, r.stderr]
                fdset = r.stdout.strip()
                res["blockdev"] = q.execute("blockdev-add", blk("d1", fdset))
                r = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, "--read-only", "--json",
                        pid, loop)
                res["ro"] = [r.returncode, r.stdout and json.loads(r.stdout)]
                ro = json.loads(r.stdout)["fds"][0]["fdset"]
                res["ro_blockdev"] = q.execute("blockdev-add", blk("d2", ro, **{
                    "read-only": True}))
                res["rw_on_ro"] = q.execute("blockdev-add", blk("d3", ro))
                res["nodes"] = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
                res["vm_has_loop"] = os.path.lexists(f"/proc/{pid}/root{loop}")
                os.mkdir("/dev/notadev")
                errs = {}
                for label, args, code in (
                        ("other-pid", [1, loop], 8),
                        ("not-a-device", [pid, "/dev/shm"], 5),
                        ("dir", [pid, "/dev/notadev"], 5),
                        ("outside", [pid, "/etc/passwd"], 4),
                        ("dotdot", [pid, "/dev/../etc/passwd"], 4)):
                    r = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, *args)
                    errs[label] = one_line_error(r, code)
                r = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, "--spec", "/tmp/vm.toml",
                        pid, loop)
                errs["spec"] = [r.returncode, r.stderr]
                res["errs"] = errs
                res["status"] = q.cmd("query-status")["status"]
        finally:
            if vm is not None:
                stop(vm)
            sh(["losetup", "-d", loop], check=False)
        res["loop"] = loop
        emit(**res)
    ''')
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
    out = sandbox(r'''
        with open("/tmp/disk.img", "wb") as fh:
            fh.truncate(16 << 20)
        loop = free_loop("/tmp/disk.img")
        vm = None
        res = {}
        try:
            os.chmod(loop, 0o600)  # root's: the user cannot open it, nor get a bind of it
            with open("/tmp/vm.toml", "w") as fh:
                fh.write(f'name = "u"\ndevices = [{{path = "{loop}", optional = true}}]\n')
            vm = start_user(argv(), "/tmp/vm.toml", timeout=90)
            pid = vm.pid
            res["vm_has_loop"] = os.path.lexists(f"/proc/{pid}/root{loop}")
            from nsmount.faces import fdpass
            with QMP.connect("/tmp/qmp.sock", timeout=60) as q:
                res["before"] = "error" in q.execute("blockdev-add", blk("d0", loop))
                dev, fs = fdpass.pass_device(NSM_SOCK, loop, expect_pid=pid)
                res["dev_fd_closed"] = dev.fd == -1
                res["blockdev"] = q.execute("blockdev-add", blk("d1", fs.path))
                res["nodes"] = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
        finally:
            if vm is not None:
                stop(vm)
            sh(["losetup", "-d", loop], check=False)
        emit(**res)
    ''')
    assert out["vm_has_loop"] is False and out["before"] is True, out
    assert out["dev_fd_closed"] and out["blockdev"] == {"return": {}}, out
    assert "d1" in out["nodes"]
