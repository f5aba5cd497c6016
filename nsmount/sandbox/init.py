"""PID 1 of a test sandbox: turn a fresh mount+PID namespace into a fake hypervisor host.

Started by ``tests/sandbox.py`` as::

    unshare --mount --pid --ipc --fork --kill-child --mount-proc --propagation private -- \
        PYTHON -I -S nsmount/sandbox/init.py CONFIG_JSON  < CODE

It refuses to touch anything unless it is PID 1 of a new PID namespace *and* its mount
namespace differs from the caller's (whose id is in CONFIG_JSON).  Then it

a. mounts fresh tmpfs on /run, /tmp and /mnt;
b. builds a tmpfs /dev (mode 755) at a staging dir with device nodes copied from the real
   /dev, detaches the old /dev, moves the new one into place, and mounts devpts
   (newinstance), /dev/shm and /dev/mqueue;
c. makes ``/`` rshared (as systemd does on a real host);
d. mounts hugetlbfs on each requested path ("PATH" or "PATH:PAGESIZE");
e. runs CODE (read from stdin) in a fresh ``python -c`` child with the environment it was
   given, reaps every orphan, and exits with the child's status.  Exiting as PID 1 makes the
   kernel SIGKILL whatever is left in the namespace.

Only the standard library is used (it runs with ``-I -S``).  Exit status 125 means the setup
itself failed (the reason is printed on stderr).
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import sys

SETUP_FAILED = 125

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# Device nodes copied from the real /dev when present there (name relative to /dev).
DEVICE_NODES = (
    "null", "zero", "full", "random", "urandom", "tty", "ptmx",
    "kvm", "net/tun", "vhost-net", "vhost-vsock", "loop-control",
    *(f"loop{i}" for i in range(8)),
)
SYMLINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
# Directories that are sandbox-private tmpfs after step (a)/(b): a hugetlbfs mount point
# may be created only below one of them, never on the real root filesystem.
PRIVATE_TREES = ("/dev", "/run", "/tmp", "/mnt")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


class SetupError(Exception):
    pass


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise SetupError(f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r}): "
                         f"{os.strerror(err)}")


def umount(target: str, flags: int) -> None:
    if _libc.umount2(_b(target), flags) != 0:
        err = ctypes.get_errno()
        raise SetupError(f"umount2({target!r}, {flags}): {os.strerror(err)}")


def log(msg: str) -> None:
    print(f"[sandbox-init] {msg}", file=sys.stderr, flush=True)


def check_isolated(cfg: dict) -> None:
    """Refuse to run anywhere but in a brand-new mount + PID namespace."""
    if os.getpid() != 1:
        raise SetupError(f"not PID 1 of a new PID namespace (pid {os.getpid()})")
    st = os.stat("/proc/self/ns/mnt")
    if (st.st_dev, st.st_ino) == tuple(cfg["caller_mntns"]):
        raise SetupError("still in the caller's mount namespace; refusing to mount anything")
    # Every mount must be private at this point (unshare --propagation private).
    with open("/proc/self/mountinfo") as f:
        for line in f:
            optional = line.split(" - ")[0].split()[6:]
            if any(o.startswith(("shared:", "master:")) for o in optional):
                raise SetupError(f"mount not private after unshare: {line.strip()}")


def setup_tmpfs_dirs() -> None:
    for path, opts, flags in (
        ("/run", "mode=755", MS_NOSUID | MS_NODEV),
        ("/tmp", "mode=1777", MS_NOSUID | MS_NODEV),
        ("/mnt", "mode=755", 0),
    ):
        if not os.path.isdir(path):
            raise SetupError(f"{path} is not a directory on this host")
        mount("tmpfs", path, "tmpfs", flags, opts)


def setup_dev() -> None:
    staging = "/run/.sandbox-dev"
    os.mkdir(staging, 0o755)
    mount("tmpfs", staging, "tmpfs", MS_NOSUID, "mode=755,size=16m")
    for name in DEVICE_NODES:
        src = os.path.join("/dev", name)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            continue
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            continue
        dst = os.path.join(staging, name)
        parent = os.path.dirname(dst)
        if not os.path.isdir(parent):
            os.mkdir(parent)
            os.chmod(parent, 0o755)
        os.mknod(dst, st.st_mode, st.st_rdev)
        os.chown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, stat.S_IMODE(st.st_mode))  # mknod honours the umask
    for name, target in SYMLINKS.items():
        os.symlink(target, os.path.join(staging, name))
    # Detach the real /dev (with its pts/shm/... submounts) and put ours in its place.
    umount("/dev", MNT_DETACH | UMOUNT_NOFOLLOW)
    mount(staging, "/dev", None, MS_MOVE)
    os.rmdir(staging)
    for d, mode in (("pts", 0o755), ("shm", 0o1777), ("mqueue", 0o1777)):
        os.mkdir(f"/dev/{d}")
        os.chmod(f"/dev/{d}", mode)
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
          "newinstance,ptmxmode=0666,mode=620")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _pagesize_kib(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMG" else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise SetupError(f"bad hugetlbfs page size {text!r}")
    return int(number) * _SIZE_UNITS[unit] // 1024


def setup_hugetlbfs(entries: list[str]) -> list[str]:
    mounted = []
    for entry in entries:
        path, _, pagesize = entry.partition(":")
        path = os.path.normpath(path)
        if not path.startswith("/"):
            raise SetupError(f"hugetlbfs path must be absolute: {entry!r}")
        data = None
        if pagesize:
            kib = _pagesize_kib(pagesize)
            if not os.path.isdir(f"/sys/kernel/mm/hugepages/hugepages-{kib}kB"):
                log(f"skipping hugetlbfs {path}: kernel has no {kib} KiB huge pages")
                continue
            data = f"pagesize={pagesize}"
        if not os.path.isdir(path):
            if not any(path.startswith(t + "/") for t in PRIVATE_TREES):
                raise SetupError(f"refusing to create {path} on the real root filesystem; "
                                 f"use a path below one of {PRIVATE_TREES}")
            os.makedirs(path, 0o755, exist_ok=True)
        mount("hugetlbfs", path, "hugetlbfs", MS_NOSUID | MS_NODEV, data)
        mounted.append(path)
    return mounted


# Runs in the fresh interpreter that executes the caller's code.
CHILD_BOOTSTRAP = """\
import builtins, linecache, os, sys, traceback
_fd = int(sys.argv[1])
with open(_fd, encoding="utf-8") as _f:
    _src = _f.read()
_name = "<sandbox-code>"
linecache.cache[_name] = (len(_src), None, _src.splitlines(True), _name)
sys.argv = [_name]
# The C-level traceback printer ignores linecache; the traceback module shows our lines.
sys.excepthook = traceback.print_exception
sys.path[0] = os.environ["NSMOUNT_SANDBOX_REPO"]
_g = {"__name__": "__main__", "__builtins__": builtins, "__file__": _name}
exec(compile(_src, _name, "exec", dont_inherit=True), _g)
"""


def run_code(cfg: dict, code: bytes, hugetlbfs: list[str]) -> int:
    memfd = os.memfd_create("sandbox-code", 0)  # inheritable, no MFD_CLOEXEC
    os.write(memfd, code)
    os.lseek(memfd, 0, os.SEEK_SET)  # the child shares this file offset
    env = dict(os.environ)
    env["NSMOUNT_SANDBOX_REPO"] = cfg["repo_root"]
    env["NSMOUNT_SANDBOX_HUGETLBFS"] = json.dumps(hugetlbfs)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.chdir(cfg["repo_root"])
    pid = os.posix_spawn(
        cfg["python"], [cfg["python"], "-c", CHILD_BOOTSTRAP, str(memfd)], env,
        file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0)],
    )
    os.close(memfd)
    os.close(devnull)
    # Reap everything (orphans are reparented to us) until the code's process exits.
    while True:
        try:
            wpid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return SETUP_FAILED
        except InterruptedError:
            continue
        if wpid == pid:
            rc = os.waitstatus_to_exitcode(status)
            return rc if rc >= 0 else 128 - rc


_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429
_OPEN_TREE_CLONE, _AT_RECURSIVE, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x8000, 0x4


def keep_visible(paths: list[str]) -> list[tuple[str, int]]:
    """Clone (detached) each path that lies under a tree the sandbox replaces with a
    fresh tmpfs, e.g. a checkout in /tmp, so it can be put back afterwards."""
    kept = []
    for path in paths:
        if any(path == t or path.startswith(t + "/") for t in PRIVATE_TREES):
            fd = _libc.syscall(_SYS_OPEN_TREE, -100, _b(path),
                               _OPEN_TREE_CLONE | _AT_RECURSIVE | os.O_CLOEXEC)
            if fd < 0:
                raise SetupError(f"open_tree({path}): {os.strerror(ctypes.get_errno())}")
            kept.append((path, fd))
    return kept


def restore_visible(kept: list[tuple[str, int]]) -> None:
    for path, fd in kept:
        os.makedirs(path, 0o755, exist_ok=True)
        if _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, _b(path),
                         _MOVE_MOUNT_F_EMPTY_PATH) != 0:
            raise SetupError(f"move_mount(-> {path}): {os.strerror(ctypes.get_errno())}")
        os.close(fd)


def main() -> int:
    cfg = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read()
    try:
        check_isolated(cfg)
        # the checkout and the interpreter may live under /tmp or /run: keep them
        kept = keep_visible(sorted({cfg["repo_root"],
                                    os.path.dirname(os.path.dirname(cfg["python"]))}))
        setup_tmpfs_dirs()
        setup_dev()
        restore_visible(kept)
        mount(None, "/", None, MS_REC | MS_SHARED)
        hugetlbfs = setup_hugetlbfs(cfg.get("hugetlbfs", []))
    except (SetupError, OSError) as exc:
        log(f"setup failed: {exc}")
        return SETUP_FAILED
    sys.stdout.flush()
    return run_code(cfg, code, hugetlbfs)


if __name__ == "__main__":
    sys.exit(main())
