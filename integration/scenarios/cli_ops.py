"""The command line against a running stand-in VM, as monitoring and admins use it.

Runs inside a sandbox, asserts there and prints ``OK``; integration/test_cli_ops.py.
"""

from __future__ import annotations

import json
import os
import subprocess

from vmhelpers import PY, nsm, sh, start_vm, stop, write_spec


def vm_has(pid: int | str, path: str) -> bool:
    return os.path.lexists(f"/proc/{pid}/root{path}")


def exit_codes_and_output() -> None:
    spec = write_spec("/run/vm.toml", name="web1", id=3, devices=["/dev/loop0"])
    vm = start_vm(spec=spec)
    pid = str(vm.pid)
    try:
        r = nsm("repair", pid)
        assert r.returncode == 0 and "status: ok" in r.stdout, r          # clean
        sh(["nsenter", "-t", pid, "-m", "rm", "/dev/null"])

        # would repair: 1, and nothing changed
        r = nsm("repair", pid, "--dry-run")
        assert r.returncode == 1 and "would repair" in r.stdout, r
        assert not vm_has(pid, "/dev/null")
        r = nsm("reconnect", pid, "--dry-run", "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == 1 and doc["summary"]["would-repair"] == 1, r
        assert doc["version"] == 1 and not vm_has(pid, "/dev/null")
        acts = [a["action"] for a in doc["vms"][0]["actions"]]
        assert "make-node" in acts and all(a == a.lower() for a in acts), acts

        # inspect: a tree with propagation, then /dev; -o picks columns
        r = nsm("inspect", pid)
        assert r.returncode == 0, r
        lines = r.stdout.splitlines()
        assert lines[2].split() == ["TARGET", "SOURCE", "FSTYPE", "PROPAGATION"], lines[:4]
        assert any(ln.startswith(("├─/dev", "└─/dev")) for ln in lines), r.stdout
        assert any("slave" in ln or "master" in ln for ln in lines), r.stdout
        assert "/dev (tmpfs):" in r.stdout and "missing-node: /dev/null" in r.stdout, r.stdout
        r = nsm("inspect", pid, "-o", "id,target")
        assert r.returncode == 0 and r.stdout.splitlines()[2].split() == ["ID", "TARGET"], r
        doc = json.loads(nsm("inspect", pid, "--json").stdout)
        assert doc["version"] == 1 and doc["mounts"] and doc["dev"], doc.keys()

        # a closed stdout ends quietly, every time
        for i in range(5):
            p = subprocess.Popen([PY, "-m", "nsmount", "inspect", pid], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            assert p.stdout and p.stderr
            p.stdout.readline()
            p.stdout.close()
            err = p.stderr.read()
            rc = p.wait(timeout=60)
            assert rc in (0, -13) and err == b"", (i, rc, err)
        r = subprocess.run(["bash", "-c", f"{PY} -m nsmount inspect {pid} | head -1; "
                            "echo ${PIPESTATUS[0]}"], capture_output=True, text=True)
        assert r.stdout.splitlines()[-1] in ("0", "141") and r.stderr == "", r

        # repair: 1, and an audit line per change (VM, action, before, after)
        r = nsm("repair", pid)
        assert r.returncode == 1 and vm_has(pid, "/dev/null"), r
        audit = [ln for ln in r.stderr.splitlines() if "action=make-node" in ln]
        assert audit and "vm=web1[" in audit[0] and "path=/dev/null" in audit[0], r.stderr
        assert 'before="missing-node' in audit[0] and 'after="' in audit[0], audit
        assert nsm("repair", pid).returncode == 0

        # -q: no report, no audit lines; the exit code still tells
        sh(["nsenter", "-t", pid, "-m", "rm", "/dev/null"])
        r = nsm("-q", "repair", pid)
        assert r.returncode == 1 and r.stdout == "" and r.stderr == "", r

        # hotplug: add repaired (1), remove of a node that is not there is ok (0)
        r = nsm("device", "remove", pid, "/dev/loop3", "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["status"] == "ok", r
        r = nsm("device", "add", pid, "/dev/loop3")
        assert r.returncode == 1 and vm_has(pid, "/dev/loop3"), r
        r = nsm("device", "remove", pid, "/dev/loop3")
        assert r.returncode == 1 and not vm_has(pid, "/dev/loop3"), r

        # global options after the command: --state-dir elsewhere means no record there
        os.makedirs("/run/other", exist_ok=True)
        r = nsm("repair", pid, "--state-dir", "/run/other")
        assert r.returncode == 11, r  # no record there, and a sleep is not QEMU
        r = nsm("--state-dir", "/run/nsmount", "repair", pid, "--json")
        assert json.loads(r.stdout)["source"] == "record", r
    finally:
        stop(vm)
    print("OK")
