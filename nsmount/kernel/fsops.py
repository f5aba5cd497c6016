"""Symlink-proof file operations relative to a directory fd.

Inside a VM's namespace anything QEMU can write may hold planted symlinks.  Every
lookup here goes through ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|
RESOLVE_NO_MAGICLINKS)`` from a trusted base fd, and every change is made with an
``*at`` call on a verified parent fd plus a leaf name, so no string path is ever
resolved through a symlink.  A symlink met on the way raises ``OSError(ELOOP)``
naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from . import consts as C
from . import syscalls

SAFE_RESOLVE = C.RESOLVE_BENEATH | C.RESOLVE_NO_SYMLINKS | C.RESOLVE_NO_MAGICLINKS
#: ...and never leaving the base's mount (a bind mount planted on the way is refused)
SAME_MOUNT = SAFE_RESOLVE | C.RESOLVE_NO_XDEV
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW


def split(rel: str) -> tuple[str, str]:
    """'a/b/c' -> ('a/b', 'c'); 'c' -> ('', 'c')."""
    rel = rel.strip("/")
    head, _, tail = rel.rpartition("/")
    return head, tail


#: longest relative path handed to one openat2 call; longer ones (the kernel allows
#: paths of any length, built component by component) are walked in pieces
_CHUNK = 3072


def open_path(base: int, rel: str, flags: int = os.O_PATH | os.O_NOFOLLOW,
              resolve: int = SAFE_RESOLVE) -> int:
    """Open ``rel`` beneath ``base`` refusing every symlink on the way (the one safe
    resolver: every lookup in a VM's namespace goes through here).  Paths longer than
    PATH_MAX are walked in pieces, each beneath the directory the previous one reached."""
    rel = rel.strip("/")
    if not rel:
        return os.dup(base) if flags & os.O_PATH else syscalls.openat2(base, ".", flags,
                                                                        resolve)
    if len(rel) * 4 <= _CHUNK or len(os.fsencode(rel)) <= _CHUNK:  # 4: UTF-8's widest
        return syscalls.openat2(base, rel, flags, resolve)
    comps = [c for c in rel.split("/") if c]
    cur = os.dup(base)
    try:
        while comps:
            piece: list[str] = []
            size = 0
            while comps and (not piece or size + len(os.fsencode(comps[0])) + 1 <= _CHUNK):
                size += len(os.fsencode(comps[0])) + 1
                piece.append(comps.pop(0))
            last = not comps
            nxt = syscalls.openat2(cur, "/".join(piece), flags if last else _O_PATH_DIR,
                                   resolve)
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise


def open_dir(base: int, rel: str) -> int:
    return open_path(base, rel, _O_PATH_DIR)


class DirCache:
    """O_PATH fds of the directories beneath one base fd, each opened (safely) once.

    Only for a phase that changes nothing (observing a namespace): a directory fd
    opened before a mount was made over it would still show the old one."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.fds: dict[str, int] = {}

    def get(self, head: str) -> int:
        fd = self.fds.get(head)
        if fd is None:
            fd = self.fds[head] = open_dir(self.base, head)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> DirCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lstat_at(dirs: DirCache, rel: str) -> os.stat_result | None:
    """lstat of ``rel`` under the cache's base; None when absent.  ELOOP if a
    *directory component* is a symlink (the leaf itself may be one and is reported as
    such)."""
    head, name = split(rel)
    try:
        pfd = dirs.get(head)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False) if name else os.fstat(pfd)
    except FileNotFoundError:
        return None


def readlink_at(dirs: DirCache, rel: str) -> str:
    head, name = split(rel)
    return os.readlink(name, dir_fd=dirs.get(head))


def ensure_dirs(base: int, rel: str, mode: int = 0o755,
                uid: int | None = None, gid: int | None = None) -> tuple[int, list[str]]:
    """mkdir -p, never following symlinks nor crossing into another mount; returns
    (O_PATH fd of the leaf dir, components created).  A symlink, non-directory or
    planted mount on the way raises OSError."""
    cur = os.dup(base)
    created: list[str] = []
    done: list[str] = []
    try:
        for comp in [c for c in rel.split("/") if c]:
            done.append(comp)
            try:
                nxt = open_path(cur, comp, _O_PATH_DIR, SAME_MOUNT)
            except FileNotFoundError:
                try:
                    os.mkdir(comp, mode, dir_fd=cur)
                    created.append("/".join(done))
                except FileExistsError:
                    pass  # raced with someone: reopen and verify below
                nxt = open_path(cur, comp, _O_PATH_DIR, SAME_MOUNT)
                if created and created[-1] == "/".join(done):
                    chmod_fd(nxt, mode)  # umask-proof
                    if uid is not None or gid is not None:
                        syscalls.fchown_empty(nxt, -1 if uid is None else uid,
                                              -1 if gid is None else gid)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                    raise OSError(exc.errno, os.strerror(exc.errno) +
                                  " (a symlink, non-directory or mount was planted here)",
                                  "/".join(done)) from None
                raise
            os.close(cur)
            cur = nxt
        return cur, created
    except BaseException:
        os.close(cur)
        raise


def _open_host_proc() -> int:
    try:
        fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1  # no procfs: only the fchmodat2/setxattrat-less fallbacks fail
    if syscalls.fstatfs(fd)[0] != C.PROC_SUPER_MAGIC:
        os.close(fd)
        return -1
    return fd


#: the host's procfs, opened when this module is first imported -- always in the
#: host namespace, before any setns.  Magic links ``thread-self/fd/N`` are resolved
#: from here, never through the ``/proc`` a VM may have covered with its own files.
HOST_PROC = _open_host_proc()


def _magic(fd: int) -> str:
    return f"thread-self/fd/{fd}"


def chmod_fd(fd: int, mode: int) -> None:
    """chmod exactly the inode ``fd`` refers to.  ``fchmodat2(AT_EMPTY_PATH)`` resolves
    no path; on kernels without it (< 6.6) the magic link is taken from the host's
    procfs fd, never from the namespace's ``/proc``."""
    try:
        syscalls.fchmod_empty(fd, mode & 0o7777)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.chmod(_magic(fd), mode & 0o7777, dir_fd=HOST_PROC)


def setxattr_fd(fd: int, key: str, value: bytes) -> None:
    """setxattr on the inode ``fd`` (an O_PATH fd is fine) refers to, through the
    host procfs: ``setxattrat(HOST_PROC, "thread-self/fd/N")`` (6.13+), else with the
    calling thread's cwd moved to the host procfs for the call."""
    try:
        syscalls.setxattrat(HOST_PROC, _magic(fd), key, value)
        return
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    saved = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(HOST_PROC)
        os.setxattr(_magic(fd), key, value)
    finally:
        os.fchdir(saved)
        os.close(saved)


_tmp_seq = 0


def _tmp_name() -> str:
    """A short temporary name (a long leaf name plus a prefix would pass NAME_MAX)."""
    global _tmp_seq
    _tmp_seq += 1
    return f".nsm{os.getpid()}.{_tmp_seq}"


def make_node(pfd: int, name: str, kind: int, rdev: int, mode: int, uid: int, gid: int,
              xattrs: Iterable[tuple[str, bytes]] = (), replace: bool = False) -> None:
    """Create (or atomically replace) a device node with exact owner, mode, xattrs.

    The node is made under a temporary name, given its attributes, verified through
    an O_PATH fd, then renamed into place: the path never shows a half-made node
    and a replaced entry (e.g. a planted symlink) is never followed.
    """
    tmp = _tmp_name()
    try:
        os.unlink(tmp, dir_fd=pfd)
    except FileNotFoundError:
        pass
    os.mknod(tmp, kind | 0o600, rdev, dir_fd=pfd)
    try:
        set_attrs(pfd, tmp, kind, rdev, mode, uid, gid, xattrs)
        if not replace:
            try:
                os.stat(name, dir_fd=pfd, follow_symlinks=False)
                raise FileExistsError(errno.EEXIST, "exists", name)
            except FileNotFoundError:
                pass
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=pfd)
        except OSError:
            pass
        raise


def set_attrs(pfd: int, name: str, kind: int, rdev: int | None, mode: int, uid: int, gid: int,
              xattrs: Iterable[tuple[str, bytes]] = ()) -> None:
    """Set owner, mode and xattrs of ``name`` after verifying what it is."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
    try:
        st = os.fstat(fd)
        if stat.S_IFMT(st.st_mode) != kind or (rdev is not None and st.st_rdev != rdev):
            raise OSError(errno.EEXIST, "unexpected file type (swapped under us?)", name)
        syscalls.fchown_empty(fd, uid, gid)
        chmod_fd(fd, mode)
        for key, val in xattrs:
            try:
                setxattr_fd(fd, key, val)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
    finally:
        os.close(fd)


def symlink_at(pfd: int, name: str, target: str) -> bool:
    """Make ``name`` a symlink to ``target``, atomically replacing whatever non-directory
    is there.  Returns False when it already pointed right."""
    try:
        if os.readlink(name, dir_fd=pfd) == target:
            return False
    except (FileNotFoundError, OSError):
        pass
    tmp = _tmp_name()
    try:
        os.unlink(tmp, dir_fd=pfd)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp, dir_fd=pfd)
    try:
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException:
        os.unlink(tmp, dir_fd=pfd)
        raise
    return True


def mount_id(fd: int, rel: str = "") -> tuple[int, bool]:
    return syscalls.statx_mount(fd, rel)


def dir_ready(mfd: int, rel: str, mode: int, uid: int, gid: int) -> bool:
    """True when ``rel`` under the mount ``mfd`` already is a directory on that same
    mount (no symlink, no mount crossed) with this owner and mode: the fast path that
    lets reconnect skip the full symlink-proof walk on its second and later runs."""
    try:
        fd = open_path(mfd, rel, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, SAME_MOUNT)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, uid, gid)
    finally:
        os.close(fd)
