"""Helpers for hostile scenarios that run inside a sandbox (see scenarios/__init__.py).

Only what integration/vmhelpers.py does not already offer: a fake /etc, snapshots of
what must never change, unprivileged stand-in VMs that unshare their own user + mount
namespace, nsmount runs that never hang the test and keep raw bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vmhelpers import PY, comm, record_path, sh, wait_for, write_spec

FAKE_ETC = "/run/fake-etc"
SHADOW = "root:$6$FAKE$sandbox-only:19000:0:99999:7:::\n"
QEMU_UID = 107
#: an unprivileged QEMU: drop to uid 107, then its own user + mount namespace
UNPRIV = ("setpriv", f"--reuid={QEMU_UID}", f"--regid={QEMU_UID}", "--clear-groups",
          "unshare", "-Urm")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


# ----------------------------------------------------------------- host-side guards
def read_text(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def mountinfo_lines(pid: int | str = "self") -> list[str]:
    return read_text(f"/proc/{pid}/mountinfo").splitlines()



def setup_fake_etc() -> None:
    """A sandbox-local copy of /etc over /etc: a wrongly followed symlink to /etc/shadow
    could only damage the copy (and the guard would see it)."""
    sh(["cp", "-a", "/etc", FAKE_ETC])
    with open(FAKE_ETC + "/shadow", "w") as fh:
        fh.write(SHADOW)
    os.chmod(FAKE_ETC + "/shadow", 0o640)
    sh(["mount", "--bind", FAKE_ETC, "/etc"])
    assert read_text("/etc/shadow") == SHADOW


def file_state(path: str) -> Any:
    """(type, inode, mode, uid, gid, rdev, content hash / link target, xattrs)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. ENAMETOOLONG deep below a PATH_MAX test mount
        return ["unreadable", exc.errno]
    extra = ""
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            extra = hashlib.sha1(fh.read()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        extra = os.readlink(path)
    try:
        xattrs = sorted((k, os.getxattr(path, k, follow_symlinks=False).hex())
                        for k in os.listxattr(path, follow_symlinks=False))
    except OSError:
        xattrs = []
    return [stat.S_IFMT(st.st_mode), st.st_ino, oct(stat.S_IMODE(st.st_mode)), st.st_uid,
            st.st_gid, st.st_rdev, extra, xattrs]


def _same_mount_dir(path: str, rdev: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_dev == rdev


def tree_snapshot(root: str) -> dict[str, Any]:
    """path -> file_state for ``root`` and everything below it on the same mount
    (symlinks and other mounts not entered)."""
    out = {root: file_state(root)}
    if out[root] is None or not os.path.isdir(root) or os.path.islink(root):
        return out
    rdev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[p] = file_state(p)
        dirnames[:] = [d for d in dirnames if _same_mount_dir(os.path.join(dirpath, d), rdev)]
    return out


def _mountinfo_lines() -> set[str]:
    with open("/proc/self/mountinfo") as fh:
        return set(fh.read().splitlines())


class Guard:
    """Everything outside the VM's own /dev tmpfs that must stay as it was: the fake
    /etc, the sandbox host's /dev (hugetlbfs contents are not entered), extra watched
    trees and files, and the host mount table."""

    def __init__(self, *watch: str) -> None:
        self.watch = ("/etc", "/dev", *watch)
        self.before = {w: tree_snapshot(w) for w in self.watch}
        self.mounts = _mountinfo_lines()

    def problems(self, allowed_mounts: Sequence[str] = (),
                 allowed_paths: Sequence[str] = ()) -> list[str]:
        out = []
        for w in self.watch:
            now, before = tree_snapshot(w), self.before[w]
            for p in sorted(set(now) | set(before)):
                if any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed_paths):
                    continue
                if now.get(p) != before.get(p):
                    out.append(f"{p}: {before.get(p)} -> {now.get(p)}")
        mi = _mountinfo_lines()
        for line in sorted(self.mounts - mi):
            out.append(f"host mount gone: {line}")
        for line in sorted(mi - self.mounts):
            if line.split(" ")[4] not in allowed_mounts:
                out.append(f"host mount added: {line}")
        return out


# ----------------------------------------------------------------- VMs
def start_vm(name: str, domain_id: int, *, devices: Sequence[str] = ("/dev/loop0",),
             hugepages: bool = False, unpriv: bool = False, script: str = "",
             prefix: Sequence[str] = (), **spec: Any) -> subprocess.Popen[str]:
    """``nsmount exec --spec F -- [setpriv ... unshare -Urm] sh -c 'SCRIPT; exec sleep 1000'``.

    The pid stays the launch record's pid through every exec.  Returns once the record
    exists and the process is ``sleep`` (the script succeeded)."""
    path = write_spec(f"/run/spec-{name}.toml", name=name, id=domain_id,
                      devices=list(devices), hugepages=hugepages, **spec)
    body = f"set -e; {script}\nexec sleep 1000" if script else "exec sleep 1000"
    argv = [*prefix, *(UNPRIV if unpriv else ()), "sh", "-c", body]
    p = subprocess.Popen([PY, "-m", "nsmount", "exec", "--spec", path, "--", *argv],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def up() -> bool:
        if p.poll() is not None:
            err = p.stderr.read() if p.stderr else ""
            raise AssertionError(f"VM {name} exited {p.returncode}: {err}")
        return os.path.exists(record_path(p.pid)) and comm(p.pid) == "sleep"

    wait_for(up, f"VM {name}")
    return p


def start_plain(argv: Sequence[str], want_comm: str = "sleep") -> subprocess.Popen[bytes]:
    """A process nsmount did not launch (no record); returns once its comm is ``want_comm``."""
    p = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        if p.poll() is not None:
            raise AssertionError(f"{argv} exited {p.returncode}")
        return comm(p.pid) == want_comm

    wait_for(up, f"{argv[0]} up")
    return p


def invm(pid: int, script: str, check: bool = True,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a shell script as root inside ``pid``'s mount namespace (the attacker)."""
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", script],
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"in-VM script failed {r.returncode}: {script!r}: {r.stderr}")
    return r


def vm_stat(pid: int, path: str) -> str:
    """``stat`` of a path as the VM sees it: '%F %a %u:%g %t:%T' or '' if absent."""
    r = invm(pid, f"stat -c '%F %a %u:%g %t:%T' {path}", check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def vm_mounts_at(pid: int, path: str) -> list[str]:
    """Optional fields (shared:/master:) of every mount at ``path`` in the VM."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as fh:
        for line in fh:
            left = line.split(" - ")[0].split(" ")
            if left[4] == path:
                out.append(" ".join(left[6:]) or "private")
    return out


def mount_hugetlbfs(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    sh(["mount", "-t", "hugetlbfs", "-o", "nosuid,nodev", "hugetlbfs", path])


def mount_at_cwd(fstype: str) -> None:
    """mount(2) on '.', for a mount point whose path is longer than PATH_MAX."""
    if _libc.mount(fstype.encode(), b".", fstype.encode(), 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount .")


# ----------------------------------------------------------------- nsmount runs
def run(args: Sequence[object], *, timeout: float = 60, env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (), stdin: bytes | None = None) -> dict[str, Any]:
    """``[prefix] python -m nsmount ARGS`` with a hard deadline; raw bytes kept.

    Returns rc (None when it had to be killed), out/err (UTF-8, undecodable bytes shown
    as \\xNN), raw_nonascii (stdout had bytes >= 0x80), raw_bad_utf8 (stdout is not valid
    UTF-8: a VM's undecodable name was printed as it is), seconds, hung, traceback."""
    e = dict(os.environ)
    e.update(env or {})
    t0 = time.monotonic()
    try:
        r = subprocess.run([*prefix, PY, "-m", "nsmount", *map(str, args)], input=stdin,
                           stdin=None if stdin is not None else subprocess.DEVNULL,
                           capture_output=True, env=e, timeout=timeout)
        rc, out, err = r.returncode, r.stdout, r.stderr
        # killed by a `timeout -s KILL` prefix (which kills its own process group too)
        hung = bool(prefix) and prefix[0] == "timeout" and rc in (-9, 124, 137)
    except subprocess.TimeoutExpired as exc:
        rc, out, err, hung = None, exc.stdout or b"", exc.stderr or b"", True
    text = out.decode("utf-8", "backslashreplace")
    etext = err.decode("utf-8", "backslashreplace")
    res: dict[str, Any] = {
        "args": [str(a) for a in args], "rc": rc, "out": text[-6000:], "err": etext[-3000:],
        "seconds": round(time.monotonic() - t0, 2), "hung": hung,
        "traceback": "Traceback" in text or "Traceback" in etext,
        "raw_nonascii": any(b >= 0x80 for b in out),
        "raw_bad_utf8": not _is_utf8(out),
    }
    try:
        res["json"] = json.loads(text)
    except ValueError:
        res["json"] = None
    return res


def outcomes(res: dict[str, Any]) -> list[dict[str, Any]]:
    """(pid, name, status, error) of every VM in a ``reconnect --json`` result."""
    data = res.get("json") or {}
    return [{"pid": o.get("pid"), "name": o.get("name"), "status": o.get("status"),
             "error": o.get("error", "")} for o in data.get("vms", [])]


def emit(**obs: Any) -> None:
    print(json.dumps(obs, default=str))


def setup_failed(pre: Mapping[str, bool], **obs: Any) -> bool:
    """True (and the observations emitted) when a precondition does not hold: the attack
    did not take effect, so nsmount must not even be run (e.g. a VM whose /dev was
    meant to reveal a sandbox directory must never be repaired onto something else)."""
    if all(pre.values()):
        return False
    emit(pre=dict(pre), **obs)
    return True


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
