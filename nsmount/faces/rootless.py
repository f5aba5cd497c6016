"""Rootless launch: a VM namespace built by an unprivileged user for its own QEMU.

The same plan/apply core as a root launch, in a user namespace of the caller's own
(uid and gid mapped to themselves, ``setgroups`` denied) and the mount namespace that
comes with it:

* ``/`` recursively slave (host mounts keep arriving, nothing leaks back);
* a detached tmpfs for ``/dev`` with the directories (owned by the caller) and
  symlinks, then **stacked** on the old ``/dev``: a user namespace cannot unmount the
  host's ``/dev`` (it is locked to the mounts it came with), so it stays hidden below;
* ``/dev/shm``, ``/dev/mqueue`` and hugetlbfs mounts under ``/dev`` cloned before and
  put back on top; ``/dev/pts`` a new devpts instance (``newinstance,ptmxmode=0666``)
  with ``/dev/ptmx -> pts/ptmx``;
* device nodes: ``mknod`` is refused in a user namespace, so each node is a bind of the
  host's node (an ``open_tree`` clone taken in the new namespace before ``/dev`` was
  covered, through the one safe resolver, checked to be the planned type and rdev)
  onto an empty file made on the new tmpfs.  Only nodes the caller may open
  read-write are planned: the rest are reported as skipped with the reason (a
  required one is an error);
* the per-domain hugepage directory in every hugetlbfs the caller may write;
* last, one more user namespace with the same ids (``SealNamespace``): every mount is
  then locked and the VM cannot unmount its ``/dev`` to reveal the host's.

The caller is the only principal: nothing here exceeds the rights the user has
anyway.  The launch record goes to the user's runtime directory
(``$XDG_RUNTIME_DIR/nsmount``, else ``/run/user/UID/nsmount``).

This module and everything the rootless ``nsmount exec --spec`` path imports use the
standard library only, so the system ``python3`` runs it without nsmount's virtualenv.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from ..engine.actions import Action
from ..engine.hostfacts import Resolved, Skipped, resolve_spec
from ..engine.hoststate import HostState, effective_id, effective_name
from ..engine.plan import PTMX, Desired, flatten_entries, hugepage_dirs_for, plan_launch
from ..errors import PrivilegeError
from ..model.devnode import Entry
from ..model.paths import components
from ..model.spec import VmSpec

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RootlessPlan:
    desired: Desired
    actions: list[Action]
    skipped: list[Skipped]
    submounts: tuple[str, ...]
    notes: list[str]


def _describe_owner(e: Entry) -> str:
    return f"{e.kind} {e.mode:04o} {e.uid}:{e.gid}"


def accessible(e: Entry) -> str:
    """'' when the caller may open the host node read-write, else why not."""
    if os.access(e.path, os.R_OK | os.W_OK, follow_symlinks=False):
        return ""
    return (f"no read-write access for uid {os.getuid()} on the host node "
            f"({_describe_owner(e)})")


def filter_accessible(resolved: list[Resolved]) -> tuple[list[Resolved], list[Skipped]]:
    """Keep the requests whose node the caller can open; required ones that it cannot
    raise PrivilegeError, optional ones are skipped with the reason."""
    ok: list[Resolved] = []
    skipped: list[Skipped] = []
    for r in resolved:
        node = r.node
        if node.path == PTMX or any(e.path == PTMX for e in r.entries):
            ok.append(r)  # replaced by the new devpts instance's ptmx
            continue
        why = accessible(node) if node.is_device else ""
        if not why:
            ok.append(r)
        elif r.request.required:
            raise PrivilegeError(f"required device {r.request.path}: {why}",
                                 hint="a rootless VM gets only nodes its user may open; "
                                 "ask the admin for access (e.g. a group) or run as root")
        else:
            skipped.append(Skipped(r.request, why))
    return ok, skipped


def hugepage_dir_writable(mount: str, path: str, uid: int) -> str:
    """'' when the caller can create (or already owns) ``path`` in the hugetlbfs at
    ``mount``, else why not.  Looked at on the host, with the caller's own rights."""
    parts = components(path)
    base = len(components(mount))
    deepest = mount
    for i in range(base, len(parts) + 1):
        cur = "/" + "/".join(parts[:i]) if i else "/"
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            break
        except OSError as exc:
            return f"{cur}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{cur} is not a directory"
        deepest = cur
        if cur == path:
            if st.st_uid != uid:
                return f"{path} exists and belongs to uid {st.st_uid}"
            return ""
    if not os.access(deepest, os.W_OK | os.X_OK, follow_symlinks=False):
        return f"uid {uid} may not create directories in {deepest}"
    return ""


def plan(spec: VmSpec, *, pid: int, host: HostState) -> RootlessPlan:
    """Read the host with the caller's rights and plan the rootless build (no change)."""
    uid, gid = os.getuid(), os.getgid()
    resolved, skipped = resolve_spec(spec)
    resolved, denied = filter_accessible(resolved)
    skipped += denied
    notes: list[str] = []
    if spec.uid not in (0, uid) or spec.gid not in (0, gid):
        notes.append(f"rootless: the spec's owner {spec.uid}:{spec.gid} is ignored; "
                     f"everything belongs to {uid}:{gid}")
    dirs: list[tuple[str, str]] = []
    if spec.wants_hugepages:
        for mount, path in hugepage_dirs_for(host.hugetlbfs, effective_id(spec, pid),
                                             effective_name(spec), spec.hugepages):
            why = hugepage_dir_writable(mount, path, uid)
            if why:
                notes.append(f"no per-domain hugepage directory in {mount}: {why}")
            else:
                dirs.append((mount, path))
    desired = Desired(entries=flatten_entries([r.entries for r in resolved]),
                      mounts=host.vm_mounts(spec), hugepage_dirs=tuple(dirs), uid=uid,
                      gid=gid, host_devs=host.mount_devs)
    subs = tuple(h.path for h in host.submounts)
    actions = plan_launch(desired, subs, rootless=True)
    kept = tuple(s for s in subs if s != "/dev/pts")
    for s in denied:
        log.warning("rootless: skipping %s: %s", s.request.path, s.reason)
    for note in notes:
        log.warning("%s", note)
    return RootlessPlan(desired, actions, skipped, kept, notes)


def build(actions: list[Action]) -> None:
    """unshare(CLONE_NEWUSER|CLONE_NEWNS) with the caller's ids, ``/`` rslave, take the
    host nodes' clones, apply.  In the calling, single-threaded process."""
    from ..engine.executor import Executor, RefusedError, prepare_host
    from ..errors import NsmountError, from_oserror
    from ..kernel import consts as C
    from ..kernel import syscalls, userns

    try:
        userns.enter_own()
        syscalls.mount(None, "/", None, C.MS_SLAVE | C.MS_REC)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL,
                         errno.EUSERS):
            raise PrivilegeError(
                f"cannot create a user namespace: {exc.strerror}",
                hint="unprivileged user namespaces may be disabled "
                "(user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor's "
                "kernel.apparmor_restrict_unprivileged_userns) or the process is "
                "multithreaded") from None
        raise from_oserror(exc, "cannot create the user + mount namespace") from None
    try:
        prep = prepare_host(actions)
    except OSError as exc:
        raise from_oserror(exc, "cannot take the host nodes") from None
    ex = Executor(prep, fail_fast=True, check_dev_mount=True)
    try:
        ex.apply(actions)
    except OSError as exc:
        raise from_oserror(exc, "building /dev failed (rootless)") from None
    except RefusedError as exc:
        raise NsmountError(f"building /dev failed (rootless): {exc}") from None
    finally:
        ex.close()
        prep.close()

