"""Bind a host device node into a user's rootless VM (the service's ``device-bind``).

A rootless VM's mount namespace is owned by its user's user namespace: everything in
it is the user's to arrange, so nothing there is trusted.  :func:`bind_device`:

1. on the host, before anything else: the node is resolved under the host's /dev,
   reopened with the one safe resolver as ``O_PATH``, verified (type, rdev), and
   cloned with ``open_tree(OPEN_TREE_CLONE)``; a read-only grant makes the clone
   read-only (``mount_setattr``).  The host's mounted superblocks are noted;
2. the VM's mount namespace comes from the pidfd (``PIDFD_GET_MNT_NAMESPACE``, no
   /proc path); its owner must be a user namespace (not the host's) created by the
   peer's uid (``NS_GET_USERNS`` + ``NS_GET_OWNER_UID``): really that user's rootless
   VM, not some other namespace;
3. ``unshare(CLONE_FS)`` + ``setns``; ``/dev`` is opened from the VM's root with the
   safe resolver (no symlink, no ``..``) and must be a tmpfs mount root that no host
   mount shares, whose root directory belongs to the user (the rootless build makes
   it so): never the host's /dev reached through a namespace that kept it;
4. the parent directories and an empty file are made relative to that /dev fd only
   (``O_NOFOLLOW``, ``O_EXCL``, never crossing a mount), as the user
   (``setfsuid``/``setfsgid``: host root is not mapped in the user's namespace), and
   the detached clone is moved onto the file by fd (``move_mount``, both ends
   ``*_EMPTY_PATH``).

Run in a forked, single-threaded process under a deadline (the service's job); the
process is left in the VM's namespace and must exit afterwards.  A bind does not
change who may open the node: its own owner and mode still apply inside the VM
(``open-device`` hands over an fd where the user cannot open the node).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from ..errors import DeniedError, NsmountError, RefusedError, UnsafePathError, from_oserror
from ..kernel import consts as C
from ..kernel import fsops, syscalls
from .fdpass import resolve_device


def _host_clone(node_path: str, type_bits: int, rdev: int, read_only: bool) -> int:
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        handle = fsops.open_path(root, node_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    finally:
        os.close(root)
    try:
        st = os.fstat(handle)
        if stat.S_IFMT(st.st_mode) != type_bits or st.st_rdev != rdev:
            raise UnsafePathError(f"{node_path} changed while it was being opened")
        tree = syscalls.open_tree(handle, "", C.OPEN_TREE_CLONE | C.OPEN_TREE_CLOEXEC
                                  | C.AT_EMPTY_PATH)
    finally:
        os.close(handle)
    try:
        # private: a clone of a node on a shared /dev (systemd's default) would be a
        # peer of the host's /dev, and whatever the user mounts on the bound node in
        # its own namespace would propagate back onto the host's node
        syscalls.mount_setattr(tree, "", C.AT_EMPTY_PATH | C.AT_RECURSIVE,
                               attr_set=C.MOUNT_ATTR_RDONLY if read_only else 0,
                               propagation=C.MS_PRIVATE)
    except BaseException:
        os.close(tree)
        raise
    return tree


def check_owner(pidfd: int, uid: int) -> int:
    """fd of the mount namespace of the pidfd's process, verified to be owned by a
    user namespace (not nsmount's own) that ``uid`` created; DeniedError otherwise."""
    mnt = syscalls.pidfd_mntns(pidfd)
    try:
        userns = syscalls.ns_owner(mnt)
        try:
            own = os.stat("/proc/self/ns/user") if fsops.HOST_PROC < 0 else \
                os.stat("self/ns/user", dir_fd=fsops.HOST_PROC)
            st = os.fstat(userns)
            if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                raise DeniedError("the VM's mount namespace belongs to the host's user "
                                  "namespace: device-bind is for rootless VMs only (a "
                                  "root-launched VM gets devices with nsmount device add)",
                                  hint="")
            owner = syscalls.userns_owner_uid(userns)
            if owner != uid:
                raise DeniedError(f"the VM's namespace was made by uid {owner}, not by the "
                                  f"asking uid {uid}", hint="")
        finally:
            os.close(userns)
        return mnt
    except BaseException:
        os.close(mnt)
        raise


def bind_device(pidfd: int, uid: int, gid: int, path: str, *, read_only: bool
                ) -> dict[str, Any]:
    """The whole bind (see the module docstring); returns what was done.  Leaves the
    calling process in the VM's mount namespace: call it in a disposable process."""
    path, node = resolve_device(path)
    try:
        tree = _host_clone(node.path, node.type_bits, node.rdev, read_only)
        host_devs = _host_mount_devs()
        mnt = check_owner(pidfd, uid)
    except OSError as exc:
        raise from_oserror(exc, "device-bind (host side)") from None
    rel = node.path.removeprefix("/dev/")
    head, name = os.path.split(rel)
    try:
        syscalls.unshare(C.CLONE_FS)
        syscalls.setns(mnt, C.CLONE_NEWNS)
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dev = fsops.open_path(root, "dev", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC)
        finally:
            os.close(root)
        _check_dev(dev, uid, host_devs)
        # the VM's tmpfs belongs to the user's namespace, where host root is not mapped:
        # what is made there is made as the user (it is the user's /dev anyway)
        syscalls.set_fsids(uid, gid)
        pfd, _made = fsops.ensure_dirs(dev, head, 0o755) if head else (os.dup(dev), [])
        try:
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC | os.O_NOCTTY, 0o600, dir_fd=pfd)
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_IFMT(st.st_mode) == node.type_bits and st.st_rdev == node.rdev:
                    return {"path": path, "node": node.path, "read_only": read_only,
                            "status": "present"}
                raise RefusedError(f"/dev/{rel} already exists in the VM and is not "
                                   f"{node.path}: refusing to cover it") from None
            try:
                syscalls.move_mount(tree, "", fd, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                    | C.MOVE_MOUNT_T_EMPTY_PATH)
            except BaseException:
                try:
                    os.unlink(name, dir_fd=pfd)
                except OSError:
                    pass
                raise
            finally:
                os.close(fd)
        finally:
            os.close(pfd)
            os.close(dev)
    except OSError as exc:
        raise from_oserror(exc, "device-bind (in the VM)") from None
    finally:
        os.close(tree)
        os.close(mnt)
    return {"path": path, "node": node.path, "read_only": read_only, "status": "bound"}


def _host_mount_devs() -> frozenset[int]:
    from ..engine.hoststate import HostState

    return HostState.read().mount_devs


def _check_dev(dev: int, uid: int, host_devs: frozenset[int]) -> None:
    """The VM's /dev must be its own tmpfs: a mount root on a tmpfs superblock the host
    does not mount anywhere, its root directory the user's."""
    ftype, _ = syscalls.fstatfs(dev)
    st = os.fstat(dev)
    _mid, is_root = syscalls.statx_mount(dev, "", C.AT_EMPTY_PATH)
    why = ""
    if ftype != C.TMPFS_MAGIC:
        why = "is not a tmpfs"
    elif st.st_dev in host_devs:
        why = "is a filesystem the host mounts (the host's /dev?)"
    elif not is_root:
        why = "is not the root of its own mount"
    elif st.st_uid != uid:
        why = f"belongs to uid {st.st_uid}, not to the VM's user {uid}"
    if why:
        raise RefusedError(f"the VM's /dev {why}: not a /dev built by a rootless "
                           "nsmount exec; refusing to bind there",
                           hint="launch the VM with nsmount exec as that user")
    if not stat.S_ISDIR(st.st_mode):
        raise NsmountError("the VM's /dev is not a directory")

