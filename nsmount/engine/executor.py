"""Apply a list of actions inside one mount namespace.

Two halves, because some things can only be done from each side:

* :func:`prepare_host` runs in the caller's (host) namespace: it clones host
  mounts with ``open_tree`` for :class:`ReplayMount` (made slave before they are
  attached, so events never flow back to the host) and takes handles of host
  mounts for :class:`RelinkMount`.
* :meth:`Executor.apply` runs inside the VM's namespace (a worker thread after
  setns, or the launcher after unshare).  All path work goes through
  :mod:`nsmount.kernel.fsops` from the namespace's root fd; every change to /dev is
  checked to land on the VM's own /dev tmpfs.

Crash injection for the tests: ``NSMOUNT_CRASH_AFTER=ActionName[:N]`` SIGKILLs the
process right after the N-th (default first) applied action of that type.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from .actions import (
    Action,
    BindNode,
    CreateDevTmpfs,
    FixNode,
    MakeDir,
    MakeHugepageDir,
    MakeNode,
    MakeSymlink,
    MountDevpts,
    PreserveMount,
    RelinkMount,
    RemoveEntry,
    ReplayMount,
    SealNamespace,
    StackDev,
    SwapDev,
    SwitchDev,
)
from ..errors import RefusedError
from ..kernel import consts as C
from ..kernel import fsops, syscalls
from ..model.paths import components, is_strictly_within, relative

log = logging.getLogger(__name__)


@dataclass
class Result:
    action: Action
    ok: bool
    error: str = ""
    note: str = ""

    def to_dict(self, action: dict[str, object] | None = None) -> dict[str, object]:
        """``action``: the action's dict form when the caller made it already."""
        d = dict(action) if action is not None else self.action.to_dict()
        d["ok"] = self.ok
        if self.error:
            d["error"] = self.error
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class HostPrep:
    """Fds opened on the host side, consumed inside the namespace."""

    clones: dict[str, int] = field(default_factory=dict)   # ReplayMount path -> clone fd
    handles: dict[str, int] = field(default_factory=dict)  # RelinkMount path -> host mount
    errors: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)  # path -> why no clone
    nodes: dict[str, int] = field(default_factory=dict)  # BindNode path -> node clone

    def close(self) -> None:
        for fd in [*self.clones.values(), *self.handles.values(), *self.nodes.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.clones.clear()
        self.handles.clear()
        self.nodes.clear()


class HostMountGone(OSError):
    """A host mount point that was unmounted while a run was under way."""


def _host_tree(root: int, path: str, flags: int) -> int:
    """open_tree of a host mount point, looked up with the one safe resolver (so a
    mount point longer than PATH_MAX works too)."""
    mp = fsops.open_dir(root, path)
    try:
        if not fsops.mount_id(mp)[1]:
            # unmounted since the host's table was read (a flapping mount): cloning now
            # would bind the directory underneath into the VM
            raise HostMountGone(errno.ENOENT, "no longer a mount point on the host", path)
        return syscalls.open_tree(mp, "", flags | C.AT_EMPTY_PATH)
    finally:
        os.close(mp)


def prepare_host(actions: Iterable[Action]) -> HostPrep:
    """Runs in the host namespace: take every host-side fd the actions need."""
    prep = HostPrep()
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _prepare(prep, actions, root)
    finally:
        os.close(root)
    return prep


def _prepare(prep: HostPrep, actions: Iterable[Action], root: int) -> None:
    for a in actions:
        try:
            if isinstance(a, ReplayMount) and a.path not in prep.clones:
                fd = _host_tree(root, a.path, C.OPEN_TREE_CLONE | C.OPEN_TREE_CLOEXEC
                                | C.AT_RECURSIVE)
                try:
                    # a clone of a shared mount joins the host's peer group: make it a
                    # slave before it is attached anywhere (events host -> VM only)
                    syscalls.mount_setattr(fd, "", C.AT_EMPTY_PATH | C.AT_RECURSIVE,
                                           propagation=C.MS_SLAVE)
                except OSError:
                    os.close(fd)
                    raise
                prep.clones[a.path] = fd
            elif isinstance(a, RelinkMount) and a.path not in prep.handles:
                prep.handles[a.path] = _host_tree(root, a.path, C.OPEN_TREE_CLOEXEC)
            elif isinstance(a, BindNode) and a.entry.path not in prep.nodes:
                prep.nodes[a.entry.path] = _node_clone(root, a)
        except HostMountGone as exc:
            prep.errors[getattr(a, "path", a.name)] = f"host side: {exc.strerror}"
        except OSError as exc:
            path = getattr(a, "path", a.name)
            if isinstance(a, ReplayMount) and a.fstype == "hugetlbfs":
                # e.g. an unbindable host mount: a fresh hugetlbfs with the same page
                # size is made inside instead (another superblock, same pages pool)
                prep.fresh[path] = f"host mount cannot be cloned ({exc.strerror})"
            else:
                prep.errors[path] = f"host side: {exc.strerror}"


def _node_clone(root: int, a: BindNode) -> int:
    """A detached clone of the host's device node (rootless launch: taken in the new
    namespace before /dev is covered), looked up with the one safe resolver and
    checked to be the node that was planned (type and rdev)."""
    e = a.entry
    fd = fsops.open_path(root, e.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_IFMT(st.st_mode) != e.type_bits or st.st_rdev != e.rdev:
            raise OSError(errno.ESTALE, "the host node changed since it was planned",
                          e.path)
        clone = syscalls.open_tree(fd, "", C.OPEN_TREE_CLONE | C.OPEN_TREE_CLOEXEC
                                   | C.AT_EMPTY_PATH)
    finally:
        os.close(fd)
    try:  # a file mount has no submounts; private keeps it out of every peer group
        syscalls.mount_setattr(clone, "", C.AT_EMPTY_PATH, propagation=C.MS_PRIVATE)
    except OSError:
        os.close(clone)
        raise
    return clone


#: pid of the parent when this process is a forked reconnect worker
WORKER_OF = 0


class _Crash:
    """Counts per process (all executors, all worker threads): ``ReplayMount:50`` in a
    reconnect of 60 VMs dies after the 50th replay overall."""

    _lock = threading.Lock()
    _left: dict[str, int] = {}

    def __init__(self) -> None:
        spec = os.environ.get("NSMOUNT_CRASH_AFTER", "")
        name, _, n = spec.partition(":")
        self.name = name
        with _Crash._lock:
            _Crash._left.setdefault(spec, int(n) if n.isdigit() else 1)
        self.spec = spec

    def after(self, action: Action) -> None:
        if self.name and action.name == self.name:
            with _Crash._lock:
                _Crash._left[self.spec] -= 1
                if _Crash._left[self.spec] <= 0:
                    if WORKER_OF:  # a forked reconnect worker takes its parent down too
                        os.kill(WORKER_OF, signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)


class Executor:
    """Applies actions from inside a namespace.  Create it in the thread that will
    apply (its root fd is that thread's root)."""

    def __init__(self, prep: HostPrep | None = None, *, fail_fast: bool = False,
                 check_dev_mount: bool = True, dev_sb: int | None = None) -> None:
        self.prep = prep or HostPrep()
        self.fail_fast = fail_fast
        self.check_dev_mount = check_dev_mount
        #: st_dev of the /dev tmpfs verified as the VM's own (the planner refused any
        #: other): every parent directory under /dev must be on it, and on its mount
        self.dev_sb = dev_sb
        self.root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.staging: int | None = None  # detached /dev tmpfs while being populated
        self.preserved: dict[str, int] = {}
        self._dev_mnt: int | None = None
        self._crash = _Crash()

    def close(self) -> None:
        for fd in [self.root, self.staging, *self.preserved.values()]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass

    # ------------------------------------------------------------- driving
    def apply(self, actions: Iterable[Action]) -> list[Result]:
        results: list[Result] = []
        for a in actions:
            try:
                note = self.apply_one(a) or ""
                results.append(Result(a, True, note=note))
            except OSError as exc:
                where = f" {exc.filename}" if exc.filename else ""
                results.append(Result(a, False, f"{exc.strerror or exc}{where}"))
                if self.fail_fast:
                    raise
            except RefusedError as exc:
                results.append(Result(a, False, str(exc)))
                if self.fail_fast:
                    raise
            self._crash.after(a)
        return results

    def apply_one(self, a: Action) -> str | None:
        handler = getattr(self, "_do_" + a.name)
        return handler(a)  # type: ignore[no-any-return]

    # ------------------------------------------------------------- helpers
    def _base(self, path: str) -> tuple[int, str]:
        """(dirfd, relative path) for a logical path in the namespace."""
        if self.staging is not None and is_strictly_within(path, "/dev"):
            return self.staging, relative(path, "/dev")
        return self.root, path.lstrip("/")

    def _dev_mount_id(self) -> int:
        if self._dev_mnt is None:
            dfd = fsops.open_dir(self.root, "dev")
            try:
                if self.dev_sb is not None and os.fstat(dfd).st_dev != self.dev_sb:
                    raise RefusedError("refusing to write under /dev: it is no longer the "
                                       "tmpfs that was verified as the VM's own")
                self._dev_mnt = fsops.mount_id(dfd)[0]
            finally:
                os.close(dfd)
        return self._dev_mnt

    def _parent(self, path: str) -> tuple[int, str]:
        """O_PATH fd of the parent directory (verified on the VM's /dev tmpfs) + leaf."""
        base, rel = self._base(path)
        head, name = fsops.split(rel)
        pfd = fsops.open_dir(base, head)
        if base == self.root and self.check_dev_mount and is_strictly_within(path, "/dev"):
            mid, _ = fsops.mount_id(pfd)
            if mid != self._dev_mount_id() or (self.dev_sb is not None
                                               and os.fstat(pfd).st_dev != self.dev_sb):
                os.close(pfd)
                raise RefusedError(f"refusing {path}: its directory is not on the VM's own "
                                   "/dev tmpfs (a submount or a planted mount)")
        return pfd, name

    def _clear_leaf(self, pfd: int, name: str, path: str, keep_dir: bool) -> str | None:
        """Remove a wrong non-directory entry at pfd/name; returns what was there."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return None
            raise RefusedError(f"refusing to replace directory {path}")
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if fsops.mount_id(fd)[1]:
                raise RefusedError(f"refusing to remove {path}: it is a mount point")
        finally:
            os.close(fd)
        what = "symlink" if stat.S_ISLNK(st.st_mode) else "file"
        os.unlink(name, dir_fd=pfd)
        return f"removed planted {what} at {path}"

    # ------------------------------------------------------------- actions
    def _do_CreateDevTmpfs(self, a: CreateDevTmpfs) -> None:
        self.staging = syscalls.new_mount(
            "tmpfs", {"mode": f"{a.mode:o}", "size": str(a.size)},
            C.MOUNT_ATTR_NOSUID, source="devfs")

    def _do_MakeDir(self, a: MakeDir) -> str | None:
        pfd, name = self._parent(a.path)
        try:
            note = self._clear_leaf(pfd, name, a.path, keep_dir=True)
            try:
                os.mkdir(name, a.mode, dir_fd=pfd)
            except FileExistsError:
                pass
            fsops.set_attrs(pfd, name, stat.S_IFDIR, None, a.mode, a.uid, a.gid)
            return note
        finally:
            os.close(pfd)

    def _do_MakeNode(self, a: MakeNode) -> None:
        e = a.entry
        pfd, name = self._parent(e.path)
        try:
            fsops.make_node(pfd, name, e.type_bits, e.rdev, e.mode, e.uid, e.gid, e.xattrs,
                            replace=a.replace)
        except FileExistsError:
            # an identical node is fine (a rerun after a crash); anything else is not
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_IFMT(st.st_mode) != e.type_bits or st.st_rdev != e.rdev:
                raise
            fsops.set_attrs(pfd, name, e.type_bits, e.rdev, e.mode, e.uid, e.gid, e.xattrs)
        finally:
            os.close(pfd)

    def _do_FixNode(self, a: FixNode) -> None:
        e = a.entry
        pfd, name = self._parent(e.path)
        try:
            fsops.set_attrs(pfd, name, e.type_bits, e.rdev if e.is_device else None,
                            e.mode, e.uid, e.gid, e.xattrs)
        finally:
            os.close(pfd)

    def _do_MakeSymlink(self, a: MakeSymlink) -> None:
        pfd, name = self._parent(a.path)
        try:
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise RefusedError(f"refusing to replace directory {a.path} by a symlink")
            except FileNotFoundError:
                pass
            fsops.symlink_at(pfd, name, a.target)
        finally:
            os.close(pfd)

    def _do_RemoveEntry(self, a: RemoveEntry) -> str | None:
        pfd, name = self._parent(a.path)
        try:
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return "already absent"
            if stat.S_ISDIR(st.st_mode):
                raise RefusedError(f"refusing to remove directory {a.path}")
            self._clear_leaf(pfd, name, a.path, keep_dir=True)
            return None
        finally:
            os.close(pfd)

    def _do_PreserveMount(self, a: PreserveMount) -> None:
        self.preserved[a.path] = syscalls.open_tree(
            C.AT_FDCWD, a.path, C.OPEN_TREE_CLONE | C.OPEN_TREE_CLOEXEC | C.AT_RECURSIVE
            | C.AT_SYMLINK_NOFOLLOW)

    def _do_SwitchDev(self, a: SwitchDev) -> None:
        if self.staging is None:
            raise RefusedError("SwitchDev without a staged /dev tmpfs")
        # detach every mount stacked on /dev (their clones are kept in self.preserved)
        for _ in range(64):
            try:
                if not syscalls.statx_mount(C.AT_FDCWD, "/dev")[1]:
                    break
            except FileNotFoundError:
                break
            syscalls.umount2("/dev", C.MNT_DETACH | C.UMOUNT_NOFOLLOW)
        syscalls.move_mount(self.staging, "", C.AT_FDCWD, "/dev", C.MOVE_MOUNT_F_EMPTY_PATH)
        os.close(self.staging)
        self.staging = None
        self._dev_mnt = None
        self._attach_preserved(a.preserved)

    def _attach_preserved(self, paths: Iterable[str]) -> None:
        for path in paths:
            fd = self.preserved.pop(path, None)
            if fd is None:
                continue
            try:
                mp = fsops.open_dir(self.root, path.lstrip("/"))
                try:
                    syscalls.move_mount(fd, "", mp, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                        | C.MOVE_MOUNT_T_EMPTY_PATH)
                finally:
                    os.close(mp)
            finally:
                os.close(fd)

    def _mountpoint(self, path: str, create: bool) -> int:
        """O_PATH fd of a mount point, creating it (only inside the VM's /dev tmpfs) and
        replacing a planted symlink or file there."""
        rel = path.lstrip("/")
        try:
            return fsops.open_dir(self.root, rel)
        except OSError as exc:
            if not create or exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                raise
        parent = "/" + "/".join(components(path)[:-1])
        if parent != "/dev":
            # create the parents first, each checked to be on the /dev tmpfs
            for i in range(2, len(components(path))):
                sub = "/" + "/".join(components(path)[:i])
                self._do_MakeDir(MakeDir(sub))
        self._do_MakeDir(MakeDir(path))
        return fsops.open_dir(self.root, rel)

    def _do_ReplayMount(self, a: ReplayMount) -> str | None:
        if a.path in self.prep.errors:
            raise RefusedError(self.prep.errors[a.path])
        clone = self.prep.clones.get(a.path)
        note = None
        if clone is None and a.path in self.prep.fresh:
            opts: dict[str, str | None] = {"mode": "755"}
            if a.pagesize:
                opts["pagesize"] = str(a.pagesize)
            clone = syscalls.new_mount("hugetlbfs", opts, C.MOUNT_ATTR_NOSUID
                                       | C.MOUNT_ATTR_NODEV, source="hugetlbfs")
            self.prep.clones[a.path] = clone
            note = f"fresh hugetlbfs mounted: {self.prep.fresh[a.path]}"
        if clone is None:
            raise RefusedError(f"no host mount prepared for {a.path}")
        mp = self._mountpoint(a.path, a.make_mountpoint and is_strictly_within(a.path, "/dev"))
        try:
            # never stack: re-check right before attaching
            have = os.fstat(mp).st_dev
            want = os.fstat(clone).st_dev
            if have == want:
                return "already visible"
            if fsops.mount_id(mp)[1] and a.path != "/dev":
                mp_fs, mp_bs = syscalls.fstatfs(mp)
                if not (a.fstype == "hugetlbfs" and mp_fs == C.HUGETLBFS_MAGIC
                        and (a.pagesize is None or mp_bs == a.pagesize)):
                    raise RefusedError(f"another mount is visible at {a.path}; not stacking")
                return "an equivalent hugetlbfs is already mounted"
            syscalls.move_mount(clone, "", mp, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                | C.MOVE_MOUNT_T_EMPTY_PATH)
            self.prep.clones.pop(a.path, None)
            os.close(clone)
            return note
        finally:
            os.close(mp)

    def _do_RelinkMount(self, a: RelinkMount) -> None:
        if a.path in self.prep.errors:
            raise RefusedError(self.prep.errors[a.path])
        host = self.prep.handles.get(a.path)
        if host is None:
            raise RefusedError(f"no host mount handle for {a.path}")
        tfd = fsops.open_dir(self.root, a.path.lstrip("/"))
        try:
            if a.path != "/" and not fsops.mount_id(tfd)[1]:
                raise RefusedError(f"{a.path} is not a mount point in the VM")
            syscalls.move_mount(host, "", tfd, "", C.MOVE_MOUNT_SET_GROUP
                                | C.MOVE_MOUNT_F_EMPTY_PATH | C.MOVE_MOUNT_T_EMPTY_PATH)
            syscalls.mount_setattr(tfd, "", C.AT_EMPTY_PATH, propagation=C.MS_SLAVE)
        finally:
            os.close(tfd)

    def _do_MakeHugepageDir(self, a: MakeHugepageDir) -> None:
        make_hugepage_dir(self.root, a.mount, a.path, a.uid, a.gid)

    def _do_SwapDev(self, a: SwapDev) -> str | None:
        new = syscalls.new_mount("tmpfs", {"mode": "755", "size": "65536"},
                                 C.MOUNT_ATTR_NOSUID, source="devfs")
        saved_staging, self.staging = self.staging, new
        try:
            for sub in a.populate:
                self.apply_one(sub)
        finally:
            self.staging = saved_staging
        # carry the VM's own submounts over (clones, recursive)
        for path in a.preserved:
            try:
                pfd = fsops.open_dir(self.root, path.lstrip("/"))
            except OSError:
                continue
            try:
                if not fsops.mount_id(pfd)[1]:
                    continue
                self.preserved[path] = syscalls.open_tree(
                    pfd, "", C.OPEN_TREE_CLONE | C.OPEN_TREE_CLOEXEC | C.AT_RECURSIVE
                    | C.AT_EMPTY_PATH)
            finally:
                os.close(pfd)
        dev = fsops.open_dir(self.root, "dev")
        note = None
        try:
            if syscalls.has_feature("move_mount_beneath") and fsops.mount_id(dev)[1]:
                syscalls.move_mount(new, "", dev, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                    | C.MOVE_MOUNT_T_EMPTY_PATH | C.MOVE_MOUNT_BENEATH)
                syscalls.umount2("/dev", C.MNT_DETACH | C.UMOUNT_NOFOLLOW)
            else:
                syscalls.move_mount(new, "", dev, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                    | C.MOVE_MOUNT_T_EMPTY_PATH)
                note = ("kernel without MOVE_MOUNT_BENEATH: new /dev stacked on the old one "
                        "(the old one stays hidden beneath)")
            self.dev_sb = os.fstat(new).st_dev  # the new tmpfs is the VM's own from now on
        finally:
            os.close(dev)
            os.close(new)
        self._dev_mnt = None
        self._attach_preserved(a.preserved)
        return note

    # ------------------------------------------------- rootless launch (user namespace)
    def _do_StackDev(self, a: StackDev) -> None:
        if self.staging is None:
            raise RefusedError("StackDev without a staged /dev tmpfs")
        dev = fsops.open_dir(self.root, "dev")
        try:
            syscalls.move_mount(self.staging, "", dev, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                | C.MOVE_MOUNT_T_EMPTY_PATH)
        finally:
            os.close(dev)
        # from now on every write under /dev must land on this tmpfs
        self.dev_sb = os.fstat(self.staging).st_dev
        os.close(self.staging)
        self.staging = None
        self._dev_mnt = None
        self._attach_preserved(a.preserved)

    def _on_dev(self, fd: int, path: str) -> None:
        if self.dev_sb is None or os.fstat(fd).st_dev != self.dev_sb:
            raise RefusedError(f"refusing {path}: not on the VM's own /dev tmpfs")

    def _do_MountDevpts(self, a: MountDevpts) -> None:
        mnt = syscalls.new_mount("devpts", {"newinstance": None, "ptmxmode": "0666",
                                            "mode": "620"},
                                 C.MOUNT_ATTR_NOSUID | C.MOUNT_ATTR_NOEXEC, source="devpts")
        try:
            mp = fsops.open_dir(self.root, a.path.lstrip("/"))
            try:
                self._on_dev(mp, a.path)
                syscalls.move_mount(mnt, "", mp, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                    | C.MOVE_MOUNT_T_EMPTY_PATH)
            finally:
                os.close(mp)
        finally:
            os.close(mnt)

    def _do_BindNode(self, a: BindNode) -> None:
        path = a.entry.path
        clone = self.prep.nodes.pop(path, None)
        if clone is None:
            raise RefusedError(self.prep.errors.get(path, f"no host node prepared for {path}"))
        try:
            pfd, name = self._parent(path)
            try:
                self._on_dev(pfd, path)
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0, dir_fd=pfd)
                os.close(fd)
                leaf = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
            finally:
                os.close(pfd)
            try:
                st = os.fstat(leaf)
                if not stat.S_ISREG(st.st_mode) or st.st_size or st.st_dev != self.dev_sb:
                    raise RefusedError(f"refusing {path}: the mount point is not the empty "
                                       "file just made on the VM's /dev tmpfs")
                syscalls.move_mount(clone, "", leaf, "", C.MOVE_MOUNT_F_EMPTY_PATH
                                    | C.MOVE_MOUNT_T_EMPTY_PATH)
            finally:
                os.close(leaf)
        finally:
            os.close(clone)

    def _do_SealNamespace(self, a: SealNamespace) -> None:
        from ..kernel import userns

        userns.enter_own(a.uid, a.gid)


def make_hugepage_dir(root: int, mount: str, path: str, uid: int, gid: int) -> None:
    """``mkdir -p`` of a per-domain hugepage dir below ``root`` (a namespace's root fd,
    host or VM): only on the hugetlbfs itself, never across a planted mount or symlink;
    parents 0755, the dir 0700 owned by the QEMU user."""
    mfd = fsops.open_dir(root, mount.lstrip("/"))
    try:
        fstype, _ = syscalls.fstatfs(mfd)
        if fstype != C.HUGETLBFS_MAGIC:
            raise RefusedError(f"{mount} is not a hugetlbfs in this namespace")
        rel = relative(path, mount)
        if fsops.dir_ready(mfd, rel, 0o700, uid, gid):
            return
        head, name = fsops.split(rel)
        pfd, _created = fsops.ensure_dirs(mfd, head, 0o755)
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                pass
            try:  # on the hugetlbfs itself: never chmod what a planted mount shows
                leaf = syscalls.openat2(pfd, name, os.O_PATH | os.O_DIRECTORY
                                        | os.O_NOFOLLOW, fsops.SAME_MOUNT)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.ELOOP, errno.ENOTDIR):
                    raise RefusedError(f"refusing {path}: not a directory on the "
                                       "hugetlbfs (a planted mount or file)") from None
                raise
            try:
                syscalls.fchown_empty(leaf, uid, gid)
                fsops.chmod_fd(leaf, 0o700)
            finally:
                os.close(leaf)
        finally:
            os.close(pfd)
    finally:
        os.close(mfd)
