"""Observe a VM's namespace from inside it (run in a thread that did setns).

Visibility is decided here, by looking: a mount listed in mountinfo may be hidden
under the VM's /dev tmpfs, so presence means "this path, looked up without
symlinks from the VM's root, lands on the host mount's superblock".  Nothing here
reads the VM's ``/proc`` (its mount table is read from the host side, see
:meth:`nsmount.state.target.Target.mount_table`); every lookup goes through
:func:`nsmount.kernel.fsops.open_path` from the VM's root fd.
"""

from __future__ import annotations

import errno
import os
import stat

from ..kernel import consts as C
from ..kernel import fsops, syscalls
from ..model.devnode import Entry
from ..model.mountinfo import MountTree
from ..model.paths import components, is_strictly_within
from ..model.namespace import Desired, MountState, Observed
from .plan import in_submount, parent_dirs


_FSTYPES = {C.TMPFS_MAGIC: "tmpfs", C.HUGETLBFS_MAGIC: "hugetlbfs", C.DEVPTS_MAGIC: "devpts",
            C.PROC_SUPER_MAGIC: "proc", 0x858458F6: "ramfs", 0xEF53: "ext4",
            0x58465342: "xfs", 0x9123683E: "btrfs", 0x65735546: "fuse", 0x794C7630: "overlay"}


def fstype_name(magic: int) -> str:
    return _FSTYPES.get(magic, hex(magic))


def observe(desired: Desired, host_devs: dict[str, int], *,
            tree: MountTree | None = None) -> Observed:
    """Gather what the calling thread's mount namespace holds for ``desired``.

    ``host_devs`` maps each desired mount path to the host's st_dev there; ``tree`` is
    the VM's mount table, read from the host side beforehand.
    """
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        obs = Observed()
        if tree is not None:
            obs.tree = tuple(tree.visible())
            obs.hidden = tuple(tree.hidden())
        # the fds opened while looking, each path opened once (nothing changes while
        # observing): /dev serves the entries' lookups too, a hugetlbfs mount point
        # the check of its per-domain dir
        with fsops.DirCache(root) as dirs:
            try:
                dfd = dirs.get("dev")
                ftype, _ = syscalls.fstatfs(dfd)
                obs.dev_fstype = fstype_name(ftype)
                obs.dev_id = os.fstat(dfd).st_dev
                obs.dev_mount_root = fsops.mount_id(dfd)[1]
            except OSError as exc:
                obs.dev_fstype = ("a symlink" if exc.errno == errno.ELOOP
                                  else "missing" if exc.errno == errno.ENOENT
                                  else f"unusable: {exc.strerror}")
            subs = tuple(h.path for h in desired.mounts if h.under_dev)
            mine = tuple(e for e in desired.entries if not in_submount(e.path, subs))
            gone = tuple(p for p in desired.gone if not in_submount(p, subs))
            for path in [*parent_dirs(mine, skip=subs), *(e.path for e in mine), *gone]:
                _observe_entry(dirs, path, obs)
            for h in desired.mounts:
                try:
                    obs.mounts[h.path] = _observe_mount(dirs, h.path, h.fstype, h.pagesize,
                                                        host_devs.get(h.path), tree)
                except OSError as exc:
                    obs.mounts[h.path] = MountState(h.path, "error",
                                                    f"cannot look at it: {exc.strerror}")
            for mount, path in desired.hugepage_dirs:
                # present = a directory on the hugetlbfs itself (not a mount planted over it)
                try:
                    mfd = dirs.get(mount.strip("/"))
                    os.close(fsops.open_path(mfd, path[len(mount):],
                                             os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW,
                                             fsops.SAME_MOUNT))
                    obs.hugepage_dirs[path] = True
                except OSError:
                    obs.hugepage_dirs[path] = False
        return obs
    finally:
        os.close(root)


def observe_host(desired: Desired) -> dict[str, bool]:
    """Which per-domain hugepage dirs exist on the host side (run in the host
    namespace): a directory on the hugetlbfs itself, owned and moded as wanted."""
    out: dict[str, bool] = {}
    if not desired.host_dirs:
        return out
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for mount, path in desired.hugepage_dirs:
            try:
                mfd = fsops.open_dir(root, mount)
            except OSError:
                out[path] = False
                continue
            try:
                out[path] = fsops.dir_ready(mfd, path[len(mount):], 0o700, desired.uid,
                                            desired.gid)
            finally:
                os.close(mfd)
    finally:
        os.close(root)
    return out


def _observe_entry(dirs: fsops.DirCache, path: str, obs: Observed) -> None:
    rel = path.lstrip("/")
    try:
        st = fsops.lstat_at(dirs, rel)
        target = fsops.readlink_at(dirs, rel) if st and stat.S_ISLNK(st.st_mode) else None
    except OSError as exc:
        obs.unsafe[path] = ("a directory on the way is a symlink (not followed)"
                            if exc.errno in (errno.ELOOP, errno.EXDEV)
                            else f"cannot look at it: {exc.strerror}")
        obs.entries[path] = None
        return
    if st is None:
        obs.entries[path] = None
        return
    obs.entries[path] = Entry.from_stat(path, st, target=target)


def _observe_mount(dirs: fsops.DirCache, path: str, fstype: str, pagesize: int | None,
                   host_dev: int | None, tree: MountTree | None) -> MountState:
    if _present_in_dev(dirs, path, host_dev):
        return MountState(path, "present")
    try:
        fd = dirs.get(path.strip("/"))
    except FileNotFoundError:
        return MountState(path, "missing-mountpoint", _hidden(path, tree) or
                          "mount point missing")
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            return MountState(path, "unsafe", "a symlink or file was planted at the mount point")
        raise
    st = os.fstat(fd)
    if host_dev is not None and st.st_dev == host_dev:
        return MountState(path, "present")
    _mid, is_root = fsops.mount_id(fd)
    if is_root and path != "/":
        ftype, bsize = syscalls.fstatfs(fd)
        if fstype == "hugetlbfs" and ftype == C.HUGETLBFS_MAGIC and (
                pagesize is None or bsize == pagesize):
            return MountState(path, "present", "an equivalent hugetlbfs")
        return MountState(path, "other", f"another filesystem is mounted at {path}")
    return MountState(path, "missing", _hidden(path, tree) or "not mounted")


def _present_in_dev(dirs: fsops.DirCache, path: str, host_dev: int | None) -> bool:
    """The common answer the cheap way, for a mount point directly in /dev (one name):
    a directory on the host mount's superblock.  ``fstatat`` from the /dev fd (opened
    safely, like every fd of ``dirs``) with the name not followed sees what opening
    ``dev/NAME`` would: no directory on the way, a symlink is not a directory.  Any
    other answer (or error) is left to the full look, which words it."""
    head, name = fsops.split(path)
    if host_dev is None or head != "dev" or not name:
        return False
    try:
        st = os.stat(name, dir_fd=dirs.get("dev"), follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_dev == host_dev


def _hidden(path: str, tree: MountTree | None) -> str:
    if tree is None:
        return ""
    for m in tree.hidden():
        if m.mountpoint == path:
            return (f"hidden: listed in mountinfo (mount id {m.mount_id}) but covered "
                    "by another mount in the VM")
    return ""


def dev_listing(max_entries: int = 4096) -> list[dict[str, object]]:
    """The VM's /dev as it sees it (its own tmpfs; submounts are listed, not entered)."""
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    out: list[dict[str, object]] = []
    try:
        try:
            dfd = fsops.open_dir(root, "dev")
        except OSError:
            return []  # no /dev to list (reported as foreign-dev by the planner)
        dev_mnt = fsops.mount_id(dfd)[0]
        stack = [("/dev", dfd)]
        while stack and len(out) < max_entries:
            path, fd = stack.pop()
            rfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            try:
                names = sorted(os.listdir(rfd))
            finally:
                os.close(rfd)
            for n in names:
                p = f"{path}/{n}"
                st = os.stat(n, dir_fd=fd, follow_symlinks=False)
                tgt = os.readlink(n, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
                e = Entry.from_stat(p, st, target=tgt).to_dict()
                if stat.S_ISDIR(st.st_mode):
                    cfd = syscalls.openat2(fd, n, os.O_PATH | os.O_DIRECTORY,
                                           fsops.SAFE_RESOLVE)
                    mid, is_root = fsops.mount_id(cfd)
                    if is_root or mid != dev_mnt:
                        e["mount"] = True
                        os.close(cfd)
                    else:
                        stack.append((p, cfd))
                out.append(e)
            os.close(fd)
    finally:
        os.close(root)
    return sorted(out, key=lambda e: components(str(e["path"])))


def planted_symlinks(listing: list[dict[str, object]]) -> list[tuple[str, str]]:
    """Symlinks in the VM's /dev pointing outside it: reported, never followed."""
    out = []
    for e in listing:
        if e.get("kind") == "lnk":
            tgt = str(e.get("target"))
            if tgt.startswith("/") and not is_strictly_within(tgt, "/dev") and \
                    str(e["path"]) not in ("/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr"):
                out.append((str(e["path"]), tgt))
    return out
