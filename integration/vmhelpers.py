"""Start VMs (stand-ins or QEMU) with nsmount, run nsmount, look at a VM from outside.

Imported by the scenario bodies in ``integration/scenarios/`` (tests as code, issue 9),
which run *inside* a sandbox (tests/sandbox.py) as its fake hypervisor host; the
process that calls these functions is that host.  Only the standard library and nsmount's
public API are used; nothing here mounts anything unless asked to
(:func:`mount_hugetlbfs`).

The one way to start a VM is :func:`start_vm`: ``nsmount exec`` of a spec (or of a
domain XML) with a stand-in command (``sleep 1000``, optionally after a shell script,
optionally as an unprivileged QEMU in its own user namespace) or a real QEMU with QMP
(``qemu=...``, then :func:`qmp`); ``library=True`` launches through ``nsmount.launch``
instead (no CLI start-up: hundreds of VMs in seconds); ``user=`` runs ``nsmount exec``
itself as an unprivileged user (a rootless launch, see :func:`user_python`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, overload

if TYPE_CHECKING:
    from nsmount.faces.launcher import Launched
    from qmp import QMP

PY = sys.executable
#: this directory: put on PYTHONPATH to run a scenario module's ``__main__``
INTEGRATION = os.path.dirname(os.path.abspath(__file__))
STATE_DIR = os.environ.get("NSMOUNT_STATE_DIR", "/run/nsmount")

#: a QEMU that starts fast and stays stopped (-S); QMP on a unix socket
QEMU_BASE_ARGV = ("qemu-system-x86_64", "-machine", "q35,accel=kvm:tcg", "-m", "64",
                  "-nodefaults", "-display", "none", "-S")
QMP_SOCK = "/tmp/qmp.sock"

QEMU_UID = 107
#: the unprivileged user of the rootless launches (nobody; no user is added to /etc)
NOBODY = 65534
#: the system Python: the virtualenv lives under /root, which an unprivileged user cannot
#: read (the rootless path needs nothing outside the standard library)
SYS_PY = "/usr/bin/python3"


def as_user(uid: int) -> list[str]:
    """The prefix that runs a command as ``uid`` (gid the same, no supplementary groups)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


#: an unprivileged QEMU: drop to uid 107, then its own user + mount namespace
UNPRIV = (*as_user(QEMU_UID), "unshare", "-Urm")


# ------------------------------------------------------------------------- generic
def sh(cmd: str | Sequence[str], check: bool = True, timeout: float | None = 120,
       **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command (a string goes through the shell); raise with its output on failure."""
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True,
                       timeout=timeout, **kw)
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


def read_text(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def comm(pid: int) -> str | None:
    try:
        return read_text(f"/proc/{pid}/comm").strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def mntns(pid: int | str = "self") -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/mnt")
    return (st.st_dev, st.st_ino)


def emit(**obs: Any) -> None:
    """Print the scenario's one JSON line (the pytest side reads the last one)."""
    print(json.dumps(obs, default=str))


# ------------------------------------------------------------------------- specs
def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # an inline table: {path = "/dev/loop5", optional = true}
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)  # ints and strings (JSON string escapes are valid TOML)


def write_spec(path: str, **kw: object) -> str:
    """Write a TOML launcher spec (top-level keys only, values may be lists and inline
    tables, e.g. ``devices=[{"path": "/dev/loop5", "optional": True}]``; ``None`` values
    are left out)."""
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
def nsm_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e.update(env or {})
    return e


def user_runtime_dir(uid: int) -> str:
    return f"/run/user/{uid}"


def user_state_dir(uid: int) -> str:
    """nsmount's state dir for a rootless user: ``$XDG_RUNTIME_DIR/nsmount``."""
    return f"{user_runtime_dir(uid)}/nsmount"


def user_python(user: int | None = None, env: Mapping[str, str] | None = None
                ) -> tuple[list[str], dict[str, str], str | None]:
    """(argv, environment, cwd) that run Python as root (this interpreter) or, with
    ``user``, as that uid: :data:`SYS_PY` under setpriv in /tmp, ``PYTHONPATH`` kept (the
    repository), ``XDG_RUNTIME_DIR`` the user's runtime dir (made here as logind would:
    0700, the user's), ``HOME=/tmp``, no ``NSMOUNT_STATE_DIR`` (nsmount keeps its state in
    :func:`user_state_dir`); ``env`` on top."""
    if user is None:
        return [PY], nsm_env(env), None
    rundir = user_runtime_dir(user)
    os.makedirs(rundir, exist_ok=True)
    os.chown(rundir, user, user)
    os.chmod(rundir, 0o700)
    os.chmod("/tmp", 0o1777)
    e = {k: v for k, v in os.environ.items() if k != "NSMOUNT_STATE_DIR"}
    e.update(XDG_RUNTIME_DIR=rundir, HOME="/tmp")
    e.update(env or {})
    return [*as_user(user), SYS_PY], e, "/tmp"


def nsm(*args: object, env: Mapping[str, str] | None = None, timeout: float = 60,
        prefix: Sequence[str] = (), user: int | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run ``[prefix...] python3 -m nsmount ARGS`` and capture its output; ``user``: as
    that unprivileged uid (:func:`user_python`)."""
    py, e, cwd = user_python(user, env)
    return subprocess.run([*prefix, *py, "-m", "nsmount", *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)


def nsm_json(*args: object, rc: int | None = None, **kw: Any) -> tuple[int, Any, str]:
    """``nsmount ARGS --json``: (exit code, the document, stderr); with ``rc`` the exit
    code is asserted.  No JSON on stdout is an AssertionError showing the output."""
    r = nsm(*args, "--json", **kw)
    if rc is not None:
        assert r.returncode == rc, f"{args}: rc {r.returncode} != {rc}\n{r.stdout}{r.stderr}"
    try:
        data = json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from nsmount {args}: rc={r.returncode}\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}") from None
    return r.returncode, data, r.stderr


def one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """rc == code, stderr is one 'nsmount: error:' line, no traceback, words in it."""
    err = r.stderr.strip()
    assert r.returncode == code, f"rc {r.returncode} != {code}: {r.stdout!r} {err!r}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert err.startswith("nsmount: error:") and "\n" not in err, repr(err)
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    return err


def kinds(doc: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(kind, path) of every drift of an inspect/repair document."""
    return {(d["kind"], d["path"]) for d in doc["drift"]}


def python_m(module: str, *args: object, user: int | None = None,
             **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` with this directory on PYTHONPATH (a scenario module's
    ``__main__``), as root or as ``user`` (:func:`user_python`); see :func:`sh`."""
    py, env, cwd = user_python(user, {
        "PYTHONPATH": f"{INTEGRATION}:{os.environ.get('PYTHONPATH', '')}"})
    return sh([*py, "-m", module, *map(str, args)], env=env, cwd=cwd, **kw)


# ------------------------------------------------------------------------- start a VM
def record_path(pid: int, state_dir: str | None = None) -> str:
    return os.path.join(state_dir or STATE_DIR, "vms", f"{pid}.json")


def qemu_argv(*extra: str, qmp: str | None = QMP_SOCK) -> list[str]:
    argv = list(QEMU_BASE_ARGV)
    if qmp:
        argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return argv + list(extra)


@overload
def start_vm(name: str = ..., domain_id: int = ..., *, library: Literal[False] = ...,
             **kw: Any) -> subprocess.Popen[str]: ...


@overload
def start_vm(name: str = ..., domain_id: int = ..., *, library: Literal[True],
             **kw: Any) -> Launched: ...


def start_vm(name: str = "x", domain_id: int = 3, *, argv: Sequence[str] = ("sleep", "1000"),
             devices: Sequence[str] = ("/dev/loop0",), hugepages: bool = False,
             spec: str | None = None, domain_xml: str | None = None,
             qemu: Sequence[str] | None = None, script: str = "", unpriv: bool = False,
             prefix: Sequence[str] = (), library: bool = False, user: int | None = None,
             stdout: Any = subprocess.DEVNULL, timeout: float = 30, **spec_kw: Any) -> Any:
    """Start one VM and return once its launch record exists and its command runs.

    ``nsmount exec --spec F -- [PREFIX] [setpriv ... unshare -Urm] ARGV`` where F is
    written from ``name``, ``domain_id``, ``devices``, ``hugepages`` and ``spec_kw``
    (``uid=107``, ``mounts=[...]``, ...), unless ``spec`` (a spec file) or ``domain_xml``
    (a domain XML file) is given.  ``script``: ARGV is ``sh -c 'set -e; SCRIPT; exec
    sleep 1000'`` (the pid stays the record's pid through every exec).  ``unpriv``: the
    command runs as uid 107 in its own user + mount namespace.  ``qemu``: ARGV is a real
    QEMU (:data:`QEMU_BASE_ARGV`, QMP on :data:`QMP_SOCK`, then these arguments).
    ``user``: ``nsmount exec`` itself runs as that uid (a rootless launch: the system
    Python, the record in the user's runtime dir, see :func:`user_python`).  Returns the
    ``Popen`` (its stderr is a pipe, its stdout ``stdout``); ``library=True``:
    ``nsmount.launch`` of the same spec from this process, returns its ``Launched``.
    """
    if qemu is not None:
        argv = qemu_argv(*qemu)
        timeout = max(timeout, 60)
    if script:
        argv = ("sh", "-c", f"set -e; {script}\nexec sleep 1000")
    want = "sleep" if script else os.path.basename(argv[0])[:15]  # comm once it runs
    argv = [*prefix, *(UNPRIV if unpriv else ()), *argv]
    if library:
        assert user is None, "library=True launches from this (root) process"
        import nsmount

        vmspec = nsmount.VmSpec(name=name, domain_id=domain_id,
                                hugepages=(0,) if hugepages else ()).with_devices(devices)
        vm = nsmount.launch(vmspec, argv)
        wait_for(lambda: comm(vm.pid) == want, f"VM {name} to exec {argv[0]}", timeout)
        return vm
    py, env, cwd = user_python(user)
    cmd = [*py, "-m", "nsmount", "exec"]
    if domain_xml:
        cmd += ["--domain-xml", domain_xml]
    else:
        cmd += ["--spec", spec or write_spec(
            f"/run/spec-{name}.toml", name=name, id=domain_id, devices=list(devices),
            hugepages=hugepages, **spec_kw)]
    p = subprocess.Popen([*cmd, "--", *argv], stdout=stdout, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=cwd)
    record = record_path(p.pid, None if user is None else user_state_dir(user))

    def up() -> bool:
        if p.poll() is not None:
            err = p.stderr.read() if p.stderr else ""
            raise AssertionError(f"VM {name}: nsmount exec exited {p.returncode}: {err}")
        return os.path.exists(record) and comm(p.pid) == want

    wait_for(up, f"VM {name} ({argv[0]})", timeout)
    return p


def stop(vm: subprocess.Popen[Any] | Launched) -> None:
    """Kill a VM started by :func:`start_vm` (or any Popen) and reap it."""
    if isinstance(vm, subprocess.Popen):
        if vm.poll() is None:
            vm.kill()
        vm.wait()
        return
    try:
        os.kill(vm.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    vm.wait()


def qmp(vm: subprocess.Popen[str], path: str = QMP_SOCK, timeout: float = 20) -> QMP:
    """Connect to a QEMU VM's QMP socket; on failure the VM is stopped and QEMU's own
    message is in the AssertionError."""
    from qmp import QMP

    try:
        return QMP.connect(path, timeout=timeout)
    except Exception as exc:
        stop(vm)
        said = vm.stderr.read() if vm.stderr else ""
        raise AssertionError(f"QMP: {exc!r}; QEMU said: {said}") from None


# ------------------------------------------------------------------------- inside a VM
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


def vm_lstat(pid: int, path: str) -> os.stat_result | None:
    """lstat of a path in the VM, through /proc/PID/root (None if absent)."""
    try:
        return os.lstat(f"/proc/{pid}/root{path}")
    except FileNotFoundError:
        return None


@contextmanager
def loop_device(img: str, size: int = 16 << 20) -> Iterator[str]:
    """A free loop device with a sparse file ``img`` of ``size`` bytes behind it, its node
    made in this host's /dev when missing (retried, as another sandbox may take the same
    free device first); detached on leaving the ``with``."""
    with open(img, "wb") as fh:
        fh.truncate(size)
    for _ in range(20):
        name = sh(["losetup", "-f"]).stdout.strip()
        n = int(name.removeprefix("/dev/loop"))
        if not os.path.exists(name):
            os.mknod(name, 0o660 | stat.S_IFBLK, os.makedev(7, n))
        if sh(["losetup", name, img], check=False).returncode == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no free loop device")
    try:
        yield name
    finally:
        sh(["losetup", "-d", name], check=False)


def mount_hugetlbfs(path: str, pagesize: str | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    opts = "nosuid,nodev" + (f",pagesize={pagesize}" if pagesize else "")
    sh(["mount", "-t", "hugetlbfs", "-o", opts, "hugetlbfs", path])


# ------------------------------------------------------------------------- mount tables
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


def unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo_lines(pid: int | str = "self") -> list[str]:
    return read_text(f"/proc/{pid}/mountinfo").splitlines()


def mountinfo(pid: int | str = "self") -> list[MountLine]:
    out = []
    for line in mountinfo_lines(pid):
        left, right = line.split(" - ", 1)
        f = left.split(" ")
        r = right.split(" ")
        out.append(MountLine(int(f[0]), int(f[1]), f[2], unescape(f[3]), unescape(f[4]),
                             f[5], tuple(f[6:]), r[0], r[1] if len(r) > 1 else ""))
    return out


def mountpoints(pid: int | str = "self") -> list[str]:
    """Every mount point listed (stacked ones and ones on hidden copies included)."""
    return [m.mountpoint for m in mountinfo(pid)]


def top_mounts(pid: int | str = "self") -> dict[str, MountLine]:
    """mount point -> the last (top) mount there."""
    return {m.mountpoint: m for m in mountinfo(pid)}


# ------------------------------------------------------------------------- hugetlbfs in VMs
HUGETLBFS_MAGIC = 0x958458f6
MB = 2 ** 20


def start_vms(n: int) -> dict[int, Any]:
    """n stand-in VMs (no hugepages wanted), guest<i> with domain id i+1."""
    return {i: start_vm(f"guest{i}", i + 1, devices=(), library=True) for i in range(n)}


def reconnect_json(*args: object, env: dict[str, str] | None = None
                   ) -> tuple[int, Any, str]:
    return nsm_json("reconnect", *args, env=env, timeout=120)


def visible_mounts(pid: int) -> list[str]:
    """Mount points of the mounts the VM can reach: attached below a reachable,
    uncovered parent or stacked on a reachable one, and not shadowed by a sibling on
    an ancestor path.  A mount stacked on another counts both (so a mount point
    listed twice here is stacked), a mount on a hidden copy of /dev counts not."""
    ms = {m.mount_id: (m.parent, m.mountpoint) for m in mountinfo(pid)}
    kids: dict[int, list[int]] = {}
    for mid, (par, _mp) in ms.items():
        kids.setdefault(par, []).append(mid)

    def under(child: str, anc: str) -> bool:
        return anc == "/" or child.startswith(anc + "/")

    def covered(mid: int) -> bool:
        return any(ms[k][1] == ms[mid][1] for k in kids.get(mid, ()))

    memo: dict[int, bool] = {}

    def reach(mid: int) -> bool:
        if mid in memo:
            return memo[mid]
        par, mp = ms[mid]
        if par not in ms or par == mid:
            r = True
        elif any(ms[s][1] != mp and under(mp, ms[s][1]) for s in kids[par] if s != mid):
            r = False                       # a sibling mounted on an ancestor path
        elif mp == ms[par][1]:
            r = reach(par)                  # stacked on its parent's root
        else:
            r = reach(par) and not covered(par)
        memo[mid] = r
        return r

    return [ms[mid][1] for mid in ms if reach(mid)]


def statfs_type(path: str) -> int:
    """f_type of the filesystem at ``path`` (statfs(2); not in os.statvfs)."""
    from nsmount.kernel import syscalls

    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        return int(syscalls.fstatfs(fd)[0])
    finally:
        os.close(fd)


def check_vm(pid: int, i: int, mounts: Sequence[tuple[str, int]]) -> list[str]:
    """Problems of VM guest<i> with each (mount point, page size) of ``mounts``."""
    probs = []
    vis = visible_mounts(pid)
    for mp, psize in mounts:
        p = f"/proc/{pid}/root{mp}"
        try:
            if statfs_type(p) != HUGETLBFS_MAGIC:
                probs.append(f"{mp}: not a hugetlbfs inside")
                continue
            if os.stat(p).st_dev != os.stat(mp).st_dev:
                probs.append(f"{mp}: st_dev differs from the host's")
            if os.statvfs(p).f_bsize != psize:
                probs.append(f"{mp}: f_bsize {os.statvfs(p).f_bsize} != {psize}")
            if not os.path.isdir(f"{p}/libvirt/qemu/{i + 1}-guest{i}"):
                probs.append(f"{mp}: per-domain dir missing")
        except OSError as exc:
            probs.append(f"{mp}: {exc}")
        n = vis.count(mp)
        if n != 1:
            probs.append(f"{mp}: {n} visible mounts")
    return probs


# ------------------------------------------------------------------------- /dev contents
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


# ------------------------------------------------------------------------- memory
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

