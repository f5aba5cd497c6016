"""ctypes wrappers for the mount, namespace and path-resolution syscalls.

Python 3.11 has no ``os.setns``/``open_tree``/``openat2``; we call ``syscall()``
through libc with ``use_errno=True`` and raise ``OSError(errno, strerror, path)``
so callers see the real errno and the path that failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from typing import Final

from . import consts as C

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_LONG = ctypes.c_long
_UINT = ctypes.c_uint
_INT = ctypes.c_int


def _fs(path: str | bytes | None) -> bytes | None:
    if path is None:
        return None
    return os.fsencode(path)


def _check(ret: int, path: str | bytes | None = None, path2: str | bytes | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        p = os.fsdecode(path) if path is not None else None
        p2 = os.fsdecode(path2) if path2 is not None else None
        raise OSError(err, os.strerror(err), p, None, p2)
    return ret


def unshare(flags: int) -> None:
    _check(_syscall(_LONG(C.SYS_unshare), _LONG(flags)))


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace(s) of ``fd`` (an ns fd or, with 5.8+, a pidfd)."""
    _check(_syscall(_LONG(C.SYS_setns), _INT(fd), _INT(nstype)), f"<fd {fd}>")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_syscall(_LONG(C.SYS_mount), _fs(source), _fs(target), _fs(fstype),
                    ctypes.c_ulong(flags), _fs(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_syscall(_LONG(C.SYS_umount2), _fs(target), _INT(flags)), target)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return _check(_syscall(_LONG(C.SYS_open_tree), _INT(dirfd), _fs(path), _UINT(flags)), path)


def move_mount(from_dirfd: int, from_path: str, to_dirfd: int, to_path: str,
               flags: int) -> None:
    _check(_syscall(_LONG(C.SYS_move_mount), _INT(from_dirfd), _fs(from_path),
                    _INT(to_dirfd), _fs(to_path), _UINT(flags)), from_path or None,
           to_path or None)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(dirfd: int, path: str, flags: int, *, attr_set: int = 0, attr_clr: int = 0,
                  propagation: int = 0) -> None:
    attr = MountAttr(attr_set, attr_clr, propagation, 0)
    _check(_syscall(_LONG(C.SYS_mount_setattr), _INT(dirfd), _fs(path), _UINT(flags),
                    ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), path or None)


def fsopen(fsname: str, flags: int = C.FSOPEN_CLOEXEC) -> int:
    return _check(_syscall(_LONG(C.SYS_fsopen), _fs(fsname), _UINT(flags)), fsname)


def fsconfig(fd: int, cmd: int, key: str | None = None, value: str | None = None,
             aux: int = 0) -> None:
    _check(_syscall(_LONG(C.SYS_fsconfig), _INT(fd), _UINT(cmd), _fs(key), _fs(value),
                    _INT(aux)), key)


def fsmount(fd: int, flags: int = C.FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    return _check(_syscall(_LONG(C.SYS_fsmount), _INT(fd), _UINT(flags), _UINT(attr_flags)))


def new_mount(fstype: str, options: dict[str, str | None], attr_flags: int = 0,
              source: str | None = None) -> int:
    """A detached mount (fsopen/fsconfig/fsmount); the fd can be populated with *at()
    calls and attached later with move_mount.  Closing it unattached unmounts it."""
    fsfd = fsopen(fstype)
    try:
        if source is not None:
            fsconfig(fsfd, C.FSCONFIG_SET_STRING, "source", source)
        for key, val in options.items():
            if val is None:
                fsconfig(fsfd, C.FSCONFIG_SET_FLAG, key)
            else:
                fsconfig(fsfd, C.FSCONFIG_SET_STRING, key, val)
        fsconfig(fsfd, C.FSCONFIG_CMD_CREATE)
        return fsmount(fsfd, C.FSMOUNT_CLOEXEC, attr_flags)
    finally:
        os.close(fsfd)


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


#: syscall(2) as a function object of its own, typed for openat2: ctypes converts the
#: arguments in C (the per-call c_long/c_int objects cost more than the lookup itself)
_openat2 = _libc["syscall"]
_openat2.restype = ctypes.c_long
_openat2.argtypes = [ctypes.c_long, _INT, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_HOW_SIZE: Final = ctypes.sizeof(OpenHow)
#: the few (flags, resolve, mode) nsmount uses, each an OpenHow built once: the kernel
#: copies it in and never writes it back, so one is shared by every call (and thread)
_HOWS: dict[tuple[int, int, int], tuple[OpenHow, int]] = {}


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    key = (flags, resolve, mode)
    how = _HOWS.get(key)
    if how is None:
        h = OpenHow(flags | os.O_CLOEXEC, mode, resolve)
        how = (h, ctypes.addressof(h))
        if len(_HOWS) < 64:
            _HOWS[key] = how
    return _check(_openat2(C.SYS_openat2, dirfd, _fs(path), how[1], _HOW_SIZE), path)


# --------------------------------------------------------------- stat helpers
class _Statx(ctypes.Structure):
    _fields_ = [("raw", ctypes.c_uint8 * 256)]


_libc.statx.argtypes = [_INT, ctypes.c_char_p, _INT, _UINT, ctypes.POINTER(_Statx)]
_libc.statx.restype = _INT


def statx_mount(dirfd: int, path: str = "", flags: int = 0) -> tuple[int, bool]:
    """(mount id, is mount root) of ``path`` relative to ``dirfd`` (no symlinks followed)."""
    buf = _Statx()
    f = flags | C.AT_SYMLINK_NOFOLLOW | C.AT_NO_AUTOMOUNT | (C.AT_EMPTY_PATH if not path else 0)
    _check(_libc.statx(dirfd, _fs(path), f, C.STATX_MNT_ID, ctypes.byref(buf)), path or None)
    raw = bytes(buf.raw)
    attributes = int.from_bytes(raw[8:16], "little")
    mnt_id = int.from_bytes(raw[144:152], "little")
    return mnt_id, bool(attributes & C.STATX_ATTR_MOUNT_ROOT)


def mount_unique_id(path: str) -> int | None:
    """The 64-bit mount id of the mount at ``path`` (``STATX_MNT_ID_UNIQUE``, 6.8+):
    never reused while the system runs, unlike the mountinfo id and the anonymous
    st_dev of a new hugetlbfs, which are handed out again once freed.  None when the
    kernel does not tell it or the path is gone."""
    buf = _Statx()
    if _libc.statx(C.AT_FDCWD, _fs(path), C.AT_SYMLINK_NOFOLLOW | C.AT_NO_AUTOMOUNT,
                   C.STATX_MNT_ID_UNIQUE, ctypes.byref(buf)) < 0:
        return None
    raw = bytes(buf.raw)
    if not int.from_bytes(raw[0:4], "little") & C.STATX_MNT_ID_UNIQUE:
        return None
    return int.from_bytes(raw[144:152], "little")


_libc.fstatfs.argtypes = [_INT, ctypes.c_void_p]
_libc.fstatfs.restype = _INT


def fstatfs(fd: int) -> tuple[int, int]:
    """(f_type, f_bsize) of the filesystem holding ``fd``; f_bsize is the hugepage size
    on hugetlbfs."""
    buf = ctypes.create_string_buffer(128)
    _check(_libc.fstatfs(fd, buf), f"<fd {fd}>")
    f_type = ctypes.c_long.from_buffer(buf, 0).value & 0xFFFFFFFF
    f_bsize = ctypes.c_long.from_buffer(buf, ctypes.sizeof(ctypes.c_long)).value
    return f_type, f_bsize


_libc.fchownat.argtypes = [_INT, ctypes.c_char_p, _UINT, _UINT, _INT]
_libc.fchownat.restype = _INT


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH fd refers to (AT_EMPTY_PATH), never a path."""
    _check(_libc.fchownat(fd, b"", uid, gid, C.AT_EMPTY_PATH), f"<fd {fd}>")


def fchmod_empty(fd: int, mode: int) -> None:
    """chmod the object an O_PATH fd refers to: ``fchmodat2(fd, "", mode, AT_EMPTY_PATH)``
    (6.6+).  No path is resolved at all, so nothing mounted in a VM matters."""
    _check(_syscall(_LONG(C.SYS_fchmodat2), _INT(fd), b"", _UINT(mode), _INT(C.AT_EMPTY_PATH)),
           f"<fd {fd}>")


class XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


def setxattrat(dirfd: int, path: str, name: str, value: bytes, at_flags: int = 0) -> None:
    """``setxattrat(2)`` (6.13+): set an xattr on ``path`` resolved from ``dirfd``."""
    buf = ctypes.create_string_buffer(value, len(value))
    args = XattrArgs(ctypes.addressof(buf), len(value), 0)
    _check(_syscall(_LONG(C.SYS_setxattrat), _INT(dirfd), _fs(path), _UINT(at_flags),
                    _fs(name), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))),
           path or f"<fd {dirfd}>")


def execveat(fd: int, argv: list[str], env: dict[str, str]) -> None:
    """Execute the file an fd refers to (opened before entering a namespace):
    ``execveat(fd, "", argv, envp, AT_EMPTY_PATH)``.  Returns only on error."""
    def cargs(items: list[bytes]) -> ctypes.Array[ctypes.c_char_p]:
        arr = (ctypes.c_char_p * (len(items) + 1))()
        for i, item in enumerate(items):
            arr[i] = item
        arr[len(items)] = None
        return arr

    a = cargs([os.fsencode(x) for x in argv])
    e = cargs([os.fsencode(f"{k}={v}") for k, v in env.items()])
    _check(_syscall(_LONG(C.SYS_execveat), _INT(fd), b"", a, e, _INT(C.AT_EMPTY_PATH)),
           argv[0] if argv else None)


def ns_owner(ns_fd: int) -> int:
    """fd of the user namespace that owns the namespace ``ns_fd`` (``NS_GET_USERNS``)."""
    import fcntl

    try:
        return fcntl.ioctl(ns_fd, C.NS_GET_USERNS)
    except OSError as exc:
        raise OSError(exc.errno, os.strerror(exc.errno or 0), f"<ns fd {ns_fd}>") from None


# ------------------------------------------------------------------ probes
_PROBED: dict[str, bool] = {}
FEATURES: Final = ("open_tree", "move_mount_beneath", "mount_setattr", "openat2", "fsopen",
                   "set_group")


def has_feature(name: str) -> bool:
    """Probe a kernel feature once (ENOSYS = missing, EINVAL on a flag = too old)."""
    if name in _PROBED:
        return _PROBED[name]
    ok = True
    try:
        if name == "openat2":
            os.close(openat2(C.AT_FDCWD, "/", os.O_PATH, C.RESOLVE_NO_SYMLINKS))
        elif name == "open_tree":
            os.close(open_tree(C.AT_FDCWD, "/", C.OPEN_TREE_CLOEXEC))
        elif name == "fsopen":
            try:
                os.close(fsopen("tmpfs"))
            except OSError as exc:
                ok = exc.errno not in (errno.ENOSYS,)
        elif name == "mount_setattr":
            try:
                mount_setattr(-1, "", C.AT_EMPTY_PATH)
            except OSError as exc:
                ok = exc.errno != errno.ENOSYS
        elif name in ("move_mount_beneath", "set_group"):
            # flags are validated before fds: EINVAL means unknown flag
            flag = C.MOVE_MOUNT_BENEATH if name == "move_mount_beneath" else C.MOVE_MOUNT_SET_GROUP
            try:
                move_mount(-1, "", -1, "", flag | C.MOVE_MOUNT_F_EMPTY_PATH
                           | C.MOVE_MOUNT_T_EMPTY_PATH)
            except OSError as exc:
                ok = exc.errno not in (errno.ENOSYS, errno.EINVAL)
        else:
            raise ValueError(name)
    except OSError as exc:
        ok = exc.errno != errno.ENOSYS
    _PROBED[name] = ok
    return ok


# ------------------------------------------------------------------ pidfds
@dataclass(frozen=True)
class PidfdInfo:
    """What the kernel says about the process behind a pidfd (``PIDFD_GET_INFO``): the
    pid as seen from the caller's pid namespace and the task's credentials."""

    pid: int
    ppid: int
    ruid: int
    rgid: int
    euid: int
    egid: int


def is_pidfd(fd: int) -> bool:
    """True when ``fd`` is a pidfd, whatever process it names.  Told from the fd's
    /proc link, never by a call on the fd itself: an fd a peer sent may be a file on
    its own FUSE mount, where even fstatfs waits for a daemon that need not answer
    (a file's link is a path, starting with '/')."""
    try:
        return os.readlink(f"/proc/thread-self/fd/{fd}") == "anon_inode:[pidfd]"
    except OSError:
        return False


def pidfd_info(fd: int) -> PidfdInfo:
    """``ioctl(fd, PIDFD_GET_INFO)``: taken from the task itself, never from a path.
    OSError ENOTTY/EINVAL: not a pidfd (or a kernel before 6.13); ESRCH: the process
    has exited."""
    import fcntl
    import struct

    buf = bytearray(64)
    struct.pack_into("=Q", buf, 0, C.PIDFD_INFO_PID | C.PIDFD_INFO_CREDS)
    fcntl.ioctl(fd, C.PIDFD_GET_INFO, buf)
    mask, _cg, pid, _tgid, ppid, ruid, rgid, euid, egid = struct.unpack_from("=QQ7I", buf)
    if not mask & C.PIDFD_INFO_CREDS:
        raise OSError(errno.EINVAL, "the kernel gave no credentials for the pidfd")
    return PidfdInfo(pid, ppid, ruid, rgid, euid, egid)


def pidfd_mntns(fd: int) -> int:
    """fd of the mount namespace of the process behind a pidfd
    (``PIDFD_GET_MNT_NAMESPACE``, 6.11+): no /proc path is resolved."""
    import fcntl

    return fcntl.ioctl(fd, C.PIDFD_GET_MNT_NAMESPACE)


def userns_owner_uid(userns_fd: int) -> int:
    """The uid that created a user namespace (``NS_GET_OWNER_UID``)."""
    import fcntl
    import struct

    buf = bytearray(4)
    fcntl.ioctl(userns_fd, C.NS_GET_OWNER_UID, buf)
    return int(struct.unpack("=I", buf)[0])


def set_fsids(uid: int, gid: int) -> None:
    """``setfsgid`` + ``setfsuid`` of the calling thread: files it creates belong to
    ``uid:gid`` and a filesystem of a user namespace where root is not mapped accepts
    them; capabilities other than the file ones (CAP_SYS_ADMIN) are kept."""
    _libc.setfsgid(_UINT(gid))
    _libc.setfsuid(_UINT(uid))
    if _libc.setfsuid(_UINT(0xFFFFFFFF)) != uid or _libc.setfsgid(_UINT(0xFFFFFFFF)) != gid:
        raise OSError(errno.EPERM, f"cannot act as {uid}:{gid} on the filesystem")
