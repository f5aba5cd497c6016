"""Syscall numbers and flag values (include/uapi/linux/mount.h, sched.h, fcntl.h)."""

from __future__ import annotations

import os
import platform

_MACHINE = platform.machine()

# Generic numbers shared by x86_64 and aarch64 (new syscalls use one table).
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_fspick = 433
SYS_openat2 = 437
SYS_mount_setattr = 442
SYS_fchmodat2 = 452
SYS_setxattrat = 463

if _MACHINE in ("x86_64", "amd64"):
    SYS_setns, SYS_unshare, SYS_mount, SYS_umount2 = 308, 272, 165, 166
    SYS_execveat = 322
elif _MACHINE in ("aarch64", "arm64"):
    SYS_setns, SYS_unshare, SYS_mount, SYS_umount2 = 268, 97, 40, 39
    SYS_execveat = 281
else:  # pragma: no cover - other architectures are not supported yet
    raise ImportError(f"nsmount: unsupported architecture {_MACHINE}")

# clone/unshare/setns
CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000

# ioctl_ns(2): _IO(0xb7, 0x1) -> an fd of the user namespace owning a namespace
NS_GET_USERNS = 0xB701
# ioctl_ns(2): _IO(0xb7, 0x4) -> the uid that created a user namespace (into a uid_t)
NS_GET_OWNER_UID = 0xB704

# pidfd ioctls (include/uapi/linux/pidfd.h): _IOWR(0xFF, 11, struct pidfd_info) with the
# 64-byte first version of the struct (6.13+); _IO(0xFF, 3): the task's mount namespace
PIDFD_GET_INFO = 0xC040FF0B
PIDFD_GET_MNT_NAMESPACE = 0xFF03
PIDFD_INFO_PID = 0x1
PIDFD_INFO_CREDS = 0x2
PIDFS_MAGIC = 0x50494446

# mount(2)
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

# umount2
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# *at flags
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_NO_AUTOMOUNT = 0x800
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000

# open_tree
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

# move_mount
MOVE_MOUNT_F_SYMLINKS = 0x1
MOVE_MOUNT_F_AUTOMOUNTS = 0x2
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_SYMLINKS = 0x10
MOVE_MOUNT_T_AUTOMOUNTS = 0x20
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOVE_MOUNT_SET_GROUP = 0x100
MOVE_MOUNT_BENEATH = 0x200

# fsopen / fsconfig / fsmount
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# openat2 resolve flags
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# statfs magic numbers
HUGETLBFS_MAGIC = 0x958458F6
TMPFS_MAGIC = 0x01021994
DEVPTS_MAGIC = 0x1CD1
PROC_SUPER_MAGIC = 0x9FA0

# statx
STATX_MNT_ID = 0x1000
STATX_MNT_ID_UNIQUE = 0x4000
STATX_ATTR_MOUNT_ROOT = 0x2000
