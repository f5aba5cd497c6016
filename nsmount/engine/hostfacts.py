"""Read what the host has for the paths a VM needs (read-only, no root needed).

Each requested path is resolved component by component with ``lstat`` so a
symlink chain (``/dev/disk/by-id/X -> ../../sda``) yields every link and its final
node; links outside /dev are followed but not reproduced (libvirt's rule).  The
result is plain data the planner consumes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from ..errors import DeviceMissingError, NsmountError, UnsafePathError
from ..model.devnode import Entry
from ..model.paths import canonical, components, is_within, join_link
from ..model.spec import DeviceRequest, VmSpec

log = logging.getLogger(__name__)

MAX_HOPS = 40  # _SC_SYMLOOP_MAX on Linux
COPIED_XATTRS = ("system.posix_acl_access", "security.selinux")


@dataclass(frozen=True)
class Resolved:
    """A request resolved on the host: entries to create, in creation order."""

    request: DeviceRequest
    entries: tuple[Entry, ...]

    @property
    def node(self) -> Entry:
        return self.entries[-1]


#: why an optional device was skipped when the host has no such path
MISSING_ON_HOST = "does not exist on the host"


@dataclass(frozen=True)
class Skipped:
    request: DeviceRequest
    reason: str


def read_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    out = []
    for key in COPIED_XATTRS:
        try:
            out.append((key, os.getxattr(path, key, follow_symlinks=False)))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT):
                raise
    return tuple(out)


def resolve(path: str, *, root: str = "/", dev_root: str = "/dev",
            allow_non_device: bool = False) -> tuple[Entry, ...]:
    """Resolve ``path`` on the host into the entries a VM /dev needs.

    Raises FileNotFoundError (missing), UnsafePathError (loop, leaves /dev, '..'),
    or DeviceMissingError (the final object is not a device node).
    """
    path = canonical(path, what="device path")
    entries: list[Entry] = []
    seen_links = 0
    pending = list(components(path))
    done: list[str] = []
    while pending:
        comp = pending.pop(0)
        cur = "/" + "/".join(done + [comp])
        st = os.lstat(_host(root, cur))
        if stat.S_ISLNK(st.st_mode):
            seen_links += 1
            if seen_links > MAX_HOPS:
                raise UnsafePathError(f"{path}: symlink loop (more than {MAX_HOPS} hops)")
            target = os.readlink(_host(root, cur))
            if is_within(cur, dev_root):
                entries.append(Entry.from_stat(cur, st, target=target))
            nxt = join_link(cur, target)
            if not nxt.startswith("/"):
                raise UnsafePathError(f"{path}: bad symlink {cur} -> {target}")
            pending = list(components(nxt)) + pending
            done = []
            continue
        done.append(comp)
    final = "/" + "/".join(done)
    if not is_within(final, dev_root):
        raise UnsafePathError(f"{path} resolves to {final}, outside {dev_root}")
    st = os.lstat(_host(root, final))
    node = Entry.from_stat(final, st, xattrs=read_xattrs(_host(root, final)))
    if not node.is_device and not allow_non_device:
        raise DeviceMissingError(f"{path} is not a device node ({node.kind})")
    entries.append(node)
    # de-duplicate keeping order (a chain may revisit a link)
    uniq: dict[str, Entry] = {}
    for e in entries:
        uniq.setdefault(e.path, e)
    return tuple(uniq.values())


def _host(root: str, path: str) -> str:
    return path if root == "/" else root.rstrip("/") + path


def resolve_spec(spec: VmSpec, *, root: str = "/",
                 cache: dict[str, tuple[Entry, ...] | OSError | NsmountError] | None = None,
                 quiet: bool = False) -> tuple[list[Resolved], list[Skipped]]:
    """Resolve every request of a spec.  Required ones that fail raise; optional ones
    are returned as skipped with the reason (the caller warns).  ``cache`` (path ->
    entries or the error) lets reconnect resolve the default nodes once for all VMs."""
    ok: list[Resolved] = []
    skipped: list[Skipped] = []
    for req in spec.all_device_requests():
        try:
            if cache is None:
                ok.append(Resolved(req, resolve(req.path, root=root)))
                continue
            hit = cache.get(req.path)
            if hit is None:
                try:
                    hit = resolve(req.path, root=root)
                except (OSError, NsmountError) as exc:
                    hit = exc
                cache[req.path] = hit
            if isinstance(hit, BaseException):
                raise hit
            ok.append(Resolved(req, hit))
        except FileNotFoundError:
            if req.required:
                raise DeviceMissingError(f"required device {req.path} does not exist on the host",
                                         hint="fix the VM definition or mark it optional")
            skipped.append(Skipped(req, MISSING_ON_HOST))
        except (UnsafePathError, DeviceMissingError) as exc:
            if req.required:
                raise
            skipped.append(Skipped(req, str(exc)))
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(f"{req.path}: symlink loop") from None
            if req.required:
                raise DeviceMissingError(f"required device {req.path}: {exc.strerror}") from None
            skipped.append(Skipped(req, exc.strerror or str(exc)))
    ok.extend(dm_target_entries(ok, root=root))
    if not quiet:
        for s in skipped:
            log.warning("skipping optional device %s: %s", s.request.path, s.reason)
    return ok, skipped


def dm_target_entries(resolved: list[Resolved], *, root: str = "/") -> list[Resolved]:
    """Device-mapper targets of every block device resolved (libvirt follows a disk's
    dm table the same way): ``/dev/block/M:m`` when the host has that link, and the
    node ``/dev/<kernel name>`` when its rdev matches.  Looked up now, at build time:
    a dm table can change between VM starts."""
    from ..state import sysfs

    have = {r.request.path for r in resolved}
    out: list[Resolved] = []
    sys_root = "/sys" if root == "/" else _host(root, "/sys")
    for r in resolved:
        node = r.node
        if node.kind != "blk":
            continue
        for name, major, minor in sysfs.dm_targets(node.major, node.minor, sys_root):
            for path in (f"/dev/block/{major}:{minor}", f"/dev/{name}"):
                if path in have:
                    continue
                try:
                    entries = resolve(path, root=root)
                except (OSError, NsmountError):
                    continue
                if entries[-1].kind != "blk" or (entries[-1].major, entries[-1].minor) != (
                        major, minor):
                    continue
                have.add(path)
                out.append(Resolved(DeviceRequest(path, required=False), entries))
    return out
