"""What hostile scenarios need beyond integration/vmhelpers.py (starting VMs, running
nsmount, looking into a VM): a fake /etc, snapshots of what must never change and the
:class:`Guard` that compares them, processes nsmount did not launch, nsmount runs that
never hang the test and keep raw bytes.  Runs inside a sandbox (see scenarios/__init__.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vmhelpers import (
    PY,
    comm,
    emit,
    mountinfo,
    mountinfo_lines,
    nsm_env,
    read_text,
    sh,
    unescape,
    wait_for,
)

FAKE_ETC = "/run/fake-etc"
SHADOW = "root:$6$FAKE$sandbox-only:19000:0:99999:7:::\n"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]


# ----------------------------------------------------------------- host-side guards
def setup_fake_etc() -> None:
    """A sandbox-local copy of /etc over /etc: a wrongly followed symlink to /etc/shadow
    could only damage the copy (and the guard would see it)."""
    sh(["cp", "-a", "/etc", FAKE_ETC])
    with open(FAKE_ETC + "/shadow", "w") as fh:
        fh.write(SHADOW)
    os.chmod(FAKE_ETC + "/shadow", 0o640)
    os.chown(FAKE_ETC + "/shadow", 0, 42)
    with open(FAKE_ETC + "/.nsmount-fake-etc", "w") as fh:
        fh.write("sandbox\n")
    sh(["mount", "--bind", FAKE_ETC, "/etc"])
    assert os.path.exists("/etc/.nsmount-fake-etc"), "fake /etc not in place"
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


class Guard:
    """Everything outside the VM's own /dev tmpfs that must stay as it was: the fake
    /etc, the sandbox host's /dev (hugetlbfs contents are not entered), extra watched
    trees and files, and the host mount table."""

    def __init__(self, *watch: str) -> None:
        self.watch = ("/etc", "/dev", *watch)
        self.before = {w: tree_snapshot(w) for w in self.watch}
        self.mounts = set(mountinfo_lines())

    def problems(self, allowed_mounts: Sequence[str] = (),
                 allowed_paths: Sequence[str] = ()) -> list[str]:
        """What changed.  ``allowed_mounts``: mount points mounted on purpose (the mount,
        its mount point and the parent directories made for it are no problem);
        ``allowed_paths``: paths that may change, with everything below them."""
        paths = [a.rstrip("/") for a in (*allowed_mounts, *allowed_paths)]
        out = []
        for w in self.watch:
            now, before = tree_snapshot(w), self.before[w]
            for p in sorted(set(now) | set(before)):
                if any(p == a or p.startswith(a + "/") for a in paths):
                    continue
                if p not in before and any(a.startswith(p + "/") for a in allowed_mounts):
                    continue  # a parent directory made for an allowed mount point
                if now.get(p) != before.get(p):
                    out.append(f"{p}: {before.get(p)} -> {now.get(p)}")
        mi = set(mountinfo_lines())
        for line in sorted(self.mounts - mi):
            out.append(f"host mount gone: {line}")
        for line in sorted(mi - self.mounts):
            if unescape(line.split(" ")[4]) not in allowed_mounts:
                out.append(f"host mount added: {line}")
        return out


def host_byid_link() -> None:
    """The sandbox host's /dev/disk/by-id/usb-X -> ../../loop1 (a by-id device)."""
    os.makedirs("/dev/disk/by-id", exist_ok=True)
    if not os.path.lexists("/dev/disk/by-id/usb-X"):
        os.symlink("../../loop1", "/dev/disk/by-id/usb-X")


# ----------------------------------------------------------------- other processes
def start_plain(argv: Sequence[str], want_comm: str = "sleep") -> subprocess.Popen[bytes]:
    """A process nsmount did not launch (no record); returns once its comm is ``want_comm``."""
    p = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        if p.poll() is not None:
            raise AssertionError(f"{argv} exited {p.returncode}")
        return comm(p.pid) == want_comm

    wait_for(up, f"{argv[0]} up")
    return p


def vm_mounts_at(pid: int, path: str) -> list[str]:
    """Optional fields (shared:/master:) of every mount at ``path`` in the VM."""
    return [" ".join(m.optional) or "private" for m in mountinfo(pid) if m.mountpoint == path]


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
    t0 = time.monotonic()
    try:
        r = subprocess.run([*prefix, PY, "-m", "nsmount", *map(str, args)], input=stdin,
                           stdin=None if stdin is not None else subprocess.DEVNULL,
                           capture_output=True, env=nsm_env(env), timeout=timeout)
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
