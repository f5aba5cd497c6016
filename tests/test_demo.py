"""The README's first command: the demo builds, breaks and repairs a VM in a sandbox."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from sandbox import privileged


@privileged
@pytest.mark.parametrize("qemu", [False, True], ids=["standin", "qemu"])
def test_demo_repairs_everything(qemu: bool) -> None:
    if qemu and not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed")
    argv = [sys.executable, "-m", "nsmount", "demo"] + ([] if qemu else ["--no-qemu"])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "status: repaired\n(exit 1)" in out
    assert "repair again: nothing to do" in out and "status: ok\n(exit 0)" in out
    for drift in ("missing-node: /dev/null", "wrong-attrs: /dev/urandom",
                  "missing-mount: /dev/shm", "missing-mount: /dev/hugepages",
                  "private-mount: /"):
        assert drift in out
    assert "(exit 10)" in out  # the host refused as a target
    if qemu:
        assert "'status': 'prelaunch'" in out
    assert "Traceback" not in out + res.stderr
