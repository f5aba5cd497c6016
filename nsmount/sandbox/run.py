"""A throwaway fake hypervisor host: a private mount + PID namespace.

Used by ``nsmount demo`` and by the test suite.  ``sandbox/init.py`` runs as PID 1
of ``unshare --mount --pid --fork --mount-proc --propagation private``, refuses to
act unless it really is in new namespaces, gives the sandbox private /run, /tmp,
/mnt and a tmpfs /dev with real nodes, makes ``/`` rshared *inside* (as systemd
does on a real host), mounts any requested hugetlbfs, then runs the given Python
code.  When it exits the kernel kills every process left in the sandbox; the real
host's mounts and /dev are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

PKG_PARENT = Path(__file__).resolve().parent.parent.parent
INIT_SCRIPT = Path(__file__).resolve().parent / "init.py"
SETUP_FAILED = 125
UNSHARE_ARGS = ("--mount", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc",
                "--propagation", "private")
SANDBOX_ENV = {"NSMOUNT_STATE_DIR": "/run/nsmount",
               "NSMOUNT_LIBVIRT_STATE_DIR": "/run/libvirt/qemu",
               "TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1", "NSMOUNT_SANDBOX": "1"}


def command(hugetlbfs: Sequence[str] = ()) -> list[str]:
    st = os.stat("/proc/self/ns/mnt")
    cfg = {"caller_mntns": [st.st_dev, st.st_ino], "repo_root": str(PKG_PARENT),
           "python": sys.executable, "hugetlbfs": list(hugetlbfs)}
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("util-linux 'unshare' is needed for the sandbox")
    return [unshare, *UNSHARE_ARGS, "--", sys.executable, "-I", "-S", str(INIT_SCRIPT),
            json.dumps(cfg)]


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ)
    out.update(SANDBOX_ENV)
    pp = out.get("PYTHONPATH")
    out["PYTHONPATH"] = str(PKG_PARENT) + (f":{pp}" if pp else "")
    if env:
        out.update(env)
    return out


def run_sandboxed(code: str, *, hugetlbfs: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, capture: bool = True,
                  timeout: float | None = None) -> int:
    """Run ``code`` in a fresh sandbox with the terminal attached; returns its exit code."""
    if os.geteuid() != 0:
        print("nsmount: error: the sandbox needs root (mount and PID namespaces, mknod)",
              file=sys.stderr)
        return 6
    proc = subprocess.run(command(hugetlbfs), input=code, text=True, env=environment(env),
                          timeout=timeout, check=False, cwd=PKG_PARENT)
    return proc.returncode
