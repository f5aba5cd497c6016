"""The installed libvirt hook script under faults, with and without ``nsmount serve``.

The hook is installed by ``nsmount install-hook`` from a virtualenv and a private copy
of the package (so both can be removed), then run as libvirt runs it: ``HOOK DOMAIN OP
SUB -`` with the domain XML on stdin and a bare environment.  A stand-in VM is the
domain ``dom1`` of a libvirt state directory (its pid file).  Every run must exit 0
with one line on stderr saying what happened (libvirt keeps it in the domain log; a
failing ``reconnect`` hook would make libvirt kill the VM).  Prints one JSON line
with ``ok``; integration/test_hook.py runs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Any

from scenarios.serve import LOG, SOCK, serve
from vmhelpers import PY, emit, read_text, sh, start_vm

XML = "<domain type='kvm'><name>dom1</name><devices/></domain>\n"
BAD_XML = "<domain><name>dom1</oops"
HOOK = "/tmp/hooks/qemu.d/50-nsmount"


def run_hook(op: str, domain: str = "dom1", stdin: str = XML,
             path: str = "/usr/bin:/bin", hook: str = HOOK) -> dict[str, Any]:
    """The hook as libvirt runs it: (exit status, stderr lines)."""
    r = subprocess.run([hook, domain, op, "begin", "-"], input=stdin, capture_output=True,
                       text=True, timeout=90, env={"PATH": path})
    return {"rc": r.returncode, "err": r.stderr.strip().splitlines()}


def logged_since(mark: int, domain: str = "dom1") -> list[str]:
    return [ln for ln in read_text(LOG)[mark:].splitlines()
            if " request " in ln and f" {domain} " in ln]


def check(obs: dict[str, Any], key: str, r: dict[str, Any], want: str) -> None:
    """Exit 0, the last stderr line contains ``want`` (before it at most the
    interpreter's own one line, e.g. "No module named nsmount"); no traceback."""
    obs[key] = r
    assert r["rc"] == 0 and 1 <= len(r["err"]) <= 2 and want in r["err"][-1], (key, r)
    assert not any("Traceback" in ln for ln in r["err"]), (key, r)


def installed_from_copy(repo: str) -> None:
    """A virtualenv (/tmp/venv) and a copy of the package (/tmp/site) install the hook."""
    shutil.copytree(os.path.join(repo, "nsmount"), "/tmp/site/nsmount",
                    ignore=shutil.ignore_patterns("__pycache__"))
    base = getattr(sys, "_base_executable", sys.executable)
    sh([base, "-m", "venv", "--without-pip", "/tmp/venv"])
    sh(["/tmp/venv/bin/python", "-m", "nsmount", "install-hook", "--hooks-dir", "/tmp/hooks"],
       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": "/tmp/site"}, cwd="/tmp")
    assert "/tmp/venv/bin/python" in read_text(HOOK)


def faults(repo: str) -> None:
    installed_from_copy(repo)
    vm = start_vm("dom1", 1, devices=())
    os.makedirs("/run/libvirt/qemu", exist_ok=True)
    with open("/run/libvirt/qemu/dom1.pid", "w") as fh:
        fh.write(f"{vm.pid}\n")
    obs: dict[str, Any] = {}

    # 1. no service at all: the in-process repair (Python), its line; the bare
    # virtualenv lacks defusedxml (it says so), nsmount's own interpreter reads the XML
    check(obs, "no-service", run_hook("reconnect"), "reconnect dom1:")
    sh([PY, "-m", "nsmount", "install-hook", "--hooks-dir", "/tmp/hooks2"])
    full = "/tmp/hooks2/qemu.d/50-nsmount"
    check(obs, "no-service-full", run_hook("reconnect", hook=full), "reconnect dom1:")
    check(obs, "no-service-bad-xml", run_hook("reconnect", stdin=BAD_XML, hook=full),
          "reconnect dom1:")
    # an ignored operation: nothing at all, not even a line
    r = run_hook("prepare")
    assert r == {"rc": 0, "err": []}, r

    # 2. a service killed -9 leaves its socket behind: socat is refused, Python repairs
    svc = serve()
    svc.send_signal(signal.SIGKILL)
    svc.wait()
    assert os.path.exists(SOCK)
    check(obs, "stale-socket", run_hook("reconnect", hook=full), "reconnect dom1: ok")

    # 3. the service runs: the shell path (socat) asks it, even with a malformed XML
    svc = serve()
    mark = len(read_text(LOG))
    check(obs, "service", run_hook("reconnect"), "done by the service")
    check(obs, "service-bad-xml", run_hook("started", stdin=BAD_XML), "done by the service")
    # a domain libvirt does not know: the service's error, one line
    check(obs, "service-unknown-domain", run_hook("reconnect", domain="nosuch"),
          "nsmount: reconnect nosuch: {")
    # no socat on PATH: the Python fallback asks the service itself
    check(obs, "service-no-socat", run_hook("reconnect", path="/nonexistent"),
          "via the service")
    lines = logged_since(mark)
    assert sum("id libvirt-hook:" in ln for ln in lines) == 2, lines
    assert sum("id libvirt-hook-py:" in ln for ln in lines) == 1, lines

    # 4. nsmount (the package) removed: the service still does it; without it, a line
    shutil.rmtree("/tmp/site")
    check(obs, "removed-service", run_hook("reconnect"), "done by the service")
    svc.terminate()
    assert svc.wait(10) == 0
    check(obs, "removed-no-service", run_hook("reconnect"), "nsmount failed")

    # 5. the interpreter removed (the whole virtualenv): the same, "is gone"
    shutil.rmtree("/tmp/venv")
    check(obs, "no-python-no-service", run_hook("started"), "is gone")
    svc = serve()
    check(obs, "no-python-service", run_hook("reconnect"), "done by the service")
    assert "Traceback" not in read_text(LOG), read_text(LOG)[-3000:]
    emit(ok=True, **obs)
