"""Handing a device to a running QEMU as an fd (issue 12, item 3): QMP ``add-fd``.

Each function runs inside its own sandbox with a real QEMU (``-S``) that has two QMP
sockets: :data:`vmhelpers.QMP_SOCK` for the scenario, :data:`NSM_SOCK` for nsmount (QEMU
serves one client per socket).  A loop device with a sparse file behind it is the disk.
Each prints one JSON line of observations; integration/test_fdpass_qmp.py asserts on it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vmhelpers import (
    NOBODY,
    emit,
    loop_device,
    nsm,
    one_line_error,
    qmp,
    start_vm,
    stop,
    write_spec,
)

NSM_SOCK = "/tmp/nsm.sock"
#: the QEMU arguments of nsmount's own QMP socket
NSM_QMP = ("-qmp", f"unix:{NSM_SOCK},server=on,wait=off")


def blk(name: str, path: str, **kw: Any) -> dict[str, Any]:
    """``blockdev-add`` arguments of a host_device node."""
    return {"driver": "host_device", "node-name": name, "filename": path, **kw}


def root_vm() -> None:
    """A VM launched by root's ``nsmount exec`` without the loop node; ``device add
    --fd-to-qmp`` hands the loop device over (dry run, read-write, read-only, refusals)."""
    with loop_device("/tmp/disk.img") as loop:
        vm = None
        res: dict[str, Any] = {}
        try:
            spec = write_spec("/tmp/vm.toml", name="f", id=2)
            vm = start_vm(spec=spec, qemu=NSM_QMP, timeout=90)
            pid = vm.pid
            with qmp(vm, timeout=60) as q:
                r = q.execute("blockdev-add", blk("d0", "/dev/fdset/0"))
                res["before"] = r.get("error", {}).get("desc", "")
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, "--dry-run", pid, loop)
                res["dry"] = [c.returncode, c.stdout]
                r = q.execute("blockdev-add", blk("d0", "/dev/fdset/0"))
                res["after_dry"] = "error" in r
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, pid, loop)
                res["add"] = [c.returncode, c.stdout, c.stderr]
                fdset = c.stdout.strip()
                res["blockdev"] = q.execute("blockdev-add", blk("d1", fdset))
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, "--read-only", "--json",
                        pid, loop)
                res["ro"] = [c.returncode, c.stdout and json.loads(c.stdout)]
                ro = json.loads(c.stdout)["fds"][0]["fdset"]
                res["ro_blockdev"] = q.execute("blockdev-add", blk("d2", ro, **{"read-only": True}))
                res["rw_on_ro"] = q.execute("blockdev-add", blk("d3", ro))
                res["nodes"] = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
                res["vm_has_loop"] = os.path.lexists(f"/proc/{pid}/root{loop}")
                os.mkdir("/dev/notadev")
                errs: dict[str, Any] = {}
                for label, args, code in (
                        ("other-pid", [1, loop], 8),
                        ("not-a-device", [pid, "/dev/shm"], 5),
                        ("dir", [pid, "/dev/notadev"], 5),
                        ("outside", [pid, "/etc/passwd"], 4),
                        ("dotdot", [pid, "/dev/../etc/passwd"], 4)):
                    c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, *args)
                    errs[label] = one_line_error(c, code)
                c = nsm("device", "add", "--fd-to-qmp", NSM_SOCK, "--spec", spec, pid, loop)
                errs["spec"] = [c.returncode, c.stderr]
                res["errs"] = errs
                res["status"] = q.cmd("query-status")["status"]
        finally:
            if vm is not None:
                stop(vm)
        res["loop"] = loop
        emit(**res)


def rootless_vm() -> None:
    """A QEMU launched rootless by the user, the loop node 0600 root (the user cannot
    open it): root hands it over with the library call ``fdpass.pass_device``."""
    from nsmount.faces import fdpass

    with loop_device("/tmp/disk.img") as loop:
        vm = None
        res: dict[str, Any] = {}
        try:
            os.chmod(loop, 0o600)  # root's: the user cannot open it, nor get a bind of it
            spec = write_spec("/tmp/vm.toml", name="u",
                              devices=[{"path": loop, "optional": True}])
            vm = start_vm(spec=spec, qemu=NSM_QMP, user=NOBODY, timeout=90)
            pid = vm.pid
            res["vm_has_loop"] = os.path.lexists(f"/proc/{pid}/root{loop}")
            with qmp(vm, timeout=60) as q:
                res["before"] = "error" in q.execute("blockdev-add", blk("d0", loop))
                dev, fs = fdpass.pass_device(NSM_SOCK, loop, expect_pid=pid)
                res["dev_fd_closed"] = dev.fd == -1
                res["blockdev"] = q.execute("blockdev-add", blk("d1", fs.path))
                res["nodes"] = [n["node-name"] for n in q.cmd("query-named-block-nodes")]
        finally:
            if vm is not None:
                stop(vm)
        emit(**res)
