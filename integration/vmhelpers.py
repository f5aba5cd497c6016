"""Helpers for integration tests that start VMs (stand-ins or QEMU) with ``nsmount exec``.

Meant to be imported *inside* a sandbox (tests/sandbox.py) by the test's code::

    import os, sys
    sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(":")[0], "integration"))
    from vmhelpers import start_exec, stop, mountinfo, ...

Only the standard library is used.  Nothing here mounts anything itself; the process
that calls these functions is expected to be a sandbox's "host".
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PY = sys.executable
STATE_DIR = os.environ.get("NSMOUNT_STATE_DIR", "/run/nsmount")

#: a QEMU that starts fast and stays stopped (-S); QMP on a unix socket
QEMU_BASE_ARGV = ("qemu-system-x86_64", "-machine", "q35,accel=kvm:tcg", "-m", "64",
                  "-nodefaults", "-display", "none", "-S")


# ------------------------------------------------------------------------- generic
def sh(cmd: str | Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} failed {r.returncode}: {r.stdout} {r.stderr}")
    return r


def wait_for(pred: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def mntns(pid: int | str = "self") -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/mnt")
    return (st.st_dev, st.st_ino)


# ------------------------------------------------------------------------- specs
def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # ints and strings (JSON string escapes are valid TOML)


def write_spec(path: str, **kw: object) -> str:
    """Write a TOML launcher spec (top-level keys only; ``None`` values are left out)."""
    with open(path, "w") as fh:
        fh.write("".join(f"{k} = {_toml_value(v)}\n" for k, v in kw.items() if v is not None))
    return path


def domain_xml(name: str, domain_id: int | None = None, *, disks: Iterable[str] = (),
               hugepages: bool = False, memory_kib: int = 65536) -> str:
    """A minimal libvirt domain XML: block disks from ``disks``, optional hugepages."""
    id_attr = f" id='{domain_id}'" if domain_id is not None else ""
    devs = "".join(
        f"<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
        f"<source dev='{d}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, d in enumerate(disks))
    mb = "<memoryBacking><hugepages/></memoryBacking>" if hugepages else ""
    return (f"<domain type='kvm'{id_attr}><name>{name}</name>"
            f"<memory unit='KiB'>{memory_kib}</memory>{mb}"
            f"<os><type arch='x86_64' machine='q35'>hvm</type></os>"
            f"<devices>{devs}</devices></domain>\n")


def write_domain_xml(path: str, *args: Any, **kw: Any) -> str:
    with open(path, "w") as fh:
        fh.write(domain_xml(*args, **kw))
    return path


# ------------------------------------------------------------------------- nsmount CLI
def nsm(*args: object, env: Mapping[str, str] | None = None, timeout: float = 60,
        prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``[prefix...] python3 -m nsmount ARGS`` and capture its output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([*prefix, PY, "-m", "nsmount", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """rc == code, stderr is one 'nsmount: error:' line, no traceback, words in it."""
    err = r.stderr.strip()
    assert r.returncode == code, f"rc {r.returncode} != {code}: {r.stdout!r} {err!r}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert err.startswith("nsmount: error:") and "\n" not in err, repr(err)
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    return err


def start_exec(argv: Sequence[str] = ("sleep", "1000"), *, spec: str | None = None,
               domain_xml: str | None = None, extra: Sequence[str] = (),
               timeout: float = 30, **popen: Any) -> subprocess.Popen[str]:
    """``nsmount exec [--spec F | --domain-xml F] -- ARGV`` in the background.

    Returns the Popen once the launch record exists and ARGV has been exec'd (the
    process's comm is ARGV[0]'s); raises AssertionError if nsmount exits first.
    """
    cmd = [PY, "-m", "nsmount", "exec", *extra]
    if spec:
        cmd += ["--spec", spec]
    if domain_xml:
        cmd += ["--domain-xml", domain_xml]
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.PIPE)
    p = subprocess.Popen([*cmd, "--", *argv], text=True, **popen)
    want = os.path.basename(argv[0])[:15]

    def up() -> bool:
        if p.poll() is not None:
            err = p.stderr.read() if p.stderr else ""
            raise AssertionError(f"nsmount exec failed {p.returncode}: {err}")
        return os.path.exists(record_path(p.pid)) and comm(p.pid) == want

    wait_for(up, f"VM {argv[0]}", timeout)
    return p


def stop(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def record_path(pid: int, state_dir: str | None = None) -> str:
    return os.path.join(state_dir or STATE_DIR, "vms", f"{pid}.json")


def qemu_argv(*extra: str, qmp: str | None = "/tmp/qmp.sock") -> list[str]:
    argv = list(QEMU_BASE_ARGV)
    if qmp:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv + list(extra)


# ------------------------------------------------------------------------- observe a VM
@dataclass(frozen=True)
class MountLine:
    mount_id: int
    parent: int
    dev: str
    root: str
    mountpoint: str
    options: str
    optional: tuple[str, ...]
    fstype: str
    source: str

    @property
    def is_slave(self) -> bool:
        return any(f.startswith("master:") for f in self.optional)

    @property
    def is_shared(self) -> bool:
        return any(f.startswith("shared:") for f in self.optional)


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo(pid: int | str = "self") -> list[MountLine]:
    out = []
    with open(f"/proc/{pid}/mountinfo") as fh:
        for line in fh:
            left, right = line.rstrip("\n").split(" - ", 1)
            f = left.split(" ")
            r = right.split(" ")
            out.append(MountLine(int(f[0]), int(f[1]), f[2], _unescape(f[3]), _unescape(f[4]),
                                 f[5], tuple(f[6:]), r[0], r[1] if len(r) > 1 else ""))
    return out


def top_mounts(pid: int | str = "self") -> dict[str, MountLine]:
    """mount point -> the last (top) mount there."""
    return {m.mountpoint: m for m in mountinfo(pid)}


def dev_tree(root: str) -> dict[str, tuple[Any, ...]]:
    """``/dev``-relative path -> (kind, major, minor, mode, uid, gid, link target) for
    everything on ``root``'s own filesystem (submounts' mount points listed, not entered)."""
    out: dict[str, tuple[Any, ...]] = {}
    rdev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            out["/dev" + p[len(root):]] = (
                stat.filemode(st.st_mode)[0],
                os.major(st.st_rdev) if dev else None, os.minor(st.st_rdev) if dev else None,
                stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == rdev]
    return out


def device_nodes(root: str) -> dict[str, tuple[Any, ...]]:
    """Only the character/block nodes of :func:`dev_tree`."""
    return {p: v for p, v in dev_tree(root).items() if v[0] in ("c", "b")}


def hugetlb_mappings(pid: int) -> dict[str, int]:
    """Mapped path -> KiB of hugetlb memory (Shared_Hugetlb + Private_Hugetlb) of ``pid``.

    Paths are as the process sees them (its mount namespace), " (deleted)" stripped.
    """
    out: dict[str, int] = {}
    cur: str | None = None
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            fields = line.split()
            if not fields:
                continue
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
                cur = " ".join(fields[5:]).removesuffix(" (deleted)") if len(fields) > 5 else ""
            elif cur is not None and fields[0] in ("Shared_Hugetlb:", "Private_Hugetlb:"):
                out[cur] = out.get(cur, 0) + int(fields[1])
    return {k: v for k, v in out.items() if v}


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)
