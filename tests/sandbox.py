"""Run Python code as a fake hypervisor "host" inside a private, throwaway sandbox.

The sandbox is a new mount + PID + IPC namespace made with util-linux ``unshare`` (all mounts
private, fresh /proc).  ``nsmount/sandbox/init.py`` runs as its PID 1 and makes it look like a
systemd hypervisor host: private tmpfs on /run, /tmp and /mnt; a tmpfs /dev with real device
nodes copied from the host (null zero full random urandom tty ptmx kvm net/tun vhost-net
loop-control loop0-7, when present) plus devpts (newinstance), /dev/shm and /dev/mqueue;
``/`` made rshared; optional hugetlbfs mounts.  Then it runs the given code in a fresh
interpreter (repo root on ``sys.path``) and exits; the kernel kills every process still
left in the PID namespace, and the mount namespace disappears with them.

Nothing is written on the real host: the code travels on the sandbox's stdin.

Usage::

    from sandbox import privileged, run_in_sandbox

    @privileged
    def test_something():
        res = run_in_sandbox('''
            import json, os
            print(json.dumps({"hp": os.path.ismount("/dev/hugepages")}))
        ''', hugetlbfs=["/dev/hugepages"])
        assert res.json() == {"hp": True}

Environment inside: everything of the caller's environment, plus
``NSMOUNT_STATE_DIR=/run/nsmount``, ``NSMOUNT_LIBVIRT_STATE_DIR=/run/libvirt/qemu``,
``TMPDIR=/tmp``, ``PYTHONUNBUFFERED=1``, ``PYTHONPATH`` starting with the repo root,
``NSMOUNT_SANDBOX=1``, ``NSMOUNT_SANDBOX_HUGETLBFS`` (JSON list of the hugetlbfs mount
points actually mounted), then ``env`` on top.  Neither state dir is created in advance.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# one sandbox implementation, shared with `nsmount demo`
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from nsmount.sandbox.run import SETUP_FAILED, UNSHARE_ARGS  # noqa: E402
from nsmount.sandbox.run import command as sandbox_command  # noqa: E402
from nsmount.sandbox.run import environment as sandbox_environment  # noqa: E402


@dataclass(frozen=True)
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float = 0.0  # wall-clock seconds of the whole run_in_sandbox call

    def json(self) -> Any:
        """Parse the last stdout line that starts with ``{`` or ``[``."""
        for line in reversed(self.stdout.splitlines()):
            if line.lstrip().startswith(("{", "[")):
                return json.loads(line)
        raise AssertionError(f"no JSON line in sandbox stdout:\n{self.describe()}")

    def describe(self) -> str:
        return (f"returncode: {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}"
                f"--- stderr ---\n{self.stderr}")


@functools.cache
def sandbox_unavailable_reason() -> str | None:
    """None if sandboxes can be made here, else why not."""
    if os.environ.get("NSMOUNT_NO_SANDBOX"):
        return "NSMOUNT_NO_SANDBOX is set"
    if sys.platform != "linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "needs root (mount/PID namespaces, mknod)"
    unshare = shutil.which("unshare")
    if unshare is None:
        return "util-linux unshare not found"
    try:
        proc = subprocess.run([unshare, *UNSHARE_ARGS, "true"], check=False, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare failed: {exc}"
    if proc.returncode != 0:
        return f"unshare failed ({proc.returncode}): {proc.stderr.strip()}"
    return None


def sandbox_available() -> bool:
    """True when running as root and ``unshare --mount --pid ...`` works."""
    return sandbox_unavailable_reason() is None


privileged = pytest.mark.skipif(
    not sandbox_available(),
    reason=f"sandbox unavailable: {sandbox_unavailable_reason()}",
)


def _mntns_id() -> list[int]:
    st = os.stat("/proc/self/ns/mnt")
    return [st.st_dev, st.st_ino]


def run_in_sandbox(
    code: str,
    *,
    hugetlbfs: Sequence[str] = (),
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> SandboxResult:
    """Run Python ``code`` (dedented) as the "host" of a fresh sandbox; see module doc.

    ``hugetlbfs`` entries are "PATH" or "PATH:PAGESIZE" ("/dev/hugepages1G:1G"); a page
    size the kernel lacks is skipped with a note on stderr.  New mount points may only be
    created below /dev, /run, /tmp or /mnt (sandbox-private).  With ``check`` a non-zero
    exit raises AssertionError; a timeout always raises AssertionError (the whole sandbox
    is killed first).
    """
    reason = sandbox_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"sandbox unavailable: {reason}")
    if isinstance(hugetlbfs, str):
        raise TypeError("hugetlbfs must be a sequence of paths, not a string")
    argv = sandbox_command(hugetlbfs)
    child_env = sandbox_environment(env)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            argv, check=False, input=textwrap.dedent(code), capture_output=True, text=True,
            env=child_env, timeout=timeout, cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        # subprocess.run SIGKILLed unshare; --kill-child takes the namespace down with it.
        out = _text(exc.stdout)
        err = _text(exc.stderr)
        raise AssertionError(
            f"sandbox timed out after {timeout}s\n--- stdout ---\n{out}--- stderr ---\n{err}"
        ) from None
    result = SandboxResult(proc.returncode, proc.stdout, proc.stderr,
                           time.monotonic() - start)
    if result.returncode == SETUP_FAILED and "[sandbox-init] setup failed" in result.stderr:
        raise AssertionError(f"sandbox setup failed\n{result.describe()}")
    if check and result.returncode != 0:
        raise AssertionError(f"sandbox code failed\n{result.describe()}")
    return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
