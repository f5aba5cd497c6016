"""Read the host's side once: its mount table, /dev submounts, hugetlbfs mounts, and
the resolved device entries of a spec.  Produces :class:`nsmount.engine.plan.Desired`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .hostfacts import MISSING_ON_HOST, Skipped, resolve_spec
from ..model import mountinfo
from ..model.hostmounts import HostMount, dev_submounts, hugetlbfs_mounts
from ..model.mountinfo import MountTree
from ..model.paths import canonical
from ..model.spec import VmSpec
from ..model.namespace import Desired
from .plan import flatten_entries, hugepage_dirs_for


def default_hugepage_size() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class HostState:
    tree: MountTree
    submounts: tuple[HostMount, ...]   # top-level /dev submounts
    hugetlbfs: tuple[HostMount, ...]
    _resolved: dict[str, Any] = field(default_factory=dict, repr=False)
    _st_dev: dict[str, int | None] = field(default_factory=dict, repr=False)
    _mount_devs: frozenset[int] | None = field(default=None, repr=False)

    @classmethod
    def read(cls) -> HostState:
        tree = MountTree(mountinfo.read("self"))
        dps = default_hugepage_size()
        subs = tuple(HostMount.from_mount(m, dps) for m in dev_submounts(tree))
        huge = hugetlbfs_mounts(tree, dps)
        from ..state.libvirtspec import configured_hugetlbfs

        only = configured_hugetlbfs()  # qemu.conf's hugetlbfs_mount, when set
        if only is not None:
            huge = [h for h in huge if h.path in only]
        return cls(tree, subs, tuple(huge))

    def mount_at(self, path: str) -> HostMount | None:
        from ..model.hostmounts import visible_top

        m = visible_top(self.tree, path)
        return HostMount.from_mount(m, default_hugepage_size()) if m else None

    def vm_mounts(self, spec: VmSpec) -> tuple[HostMount, ...]:
        """Every host mount the VM must see: /dev submounts, hugetlbfs, configured."""
        out: dict[str, HostMount] = {}
        for h in (*self.submounts, *self.hugetlbfs):
            out.setdefault(h.path, h)
        for p in spec.mounts:
            extra = self.mount_at(canonical(p))
            if extra is not None:
                out.setdefault(extra.path, extra)
        return tuple(out.values())

    def st_dev(self, path: str) -> int | None:
        """st_dev of a host path, looked up once per HostState (a snapshot, like the
        mount table it was read with)."""
        if path not in self._st_dev:
            from ..kernel import fsops

            try:
                root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    fd = fsops.open_path(root, path, os.O_PATH | os.O_CLOEXEC)
                finally:
                    os.close(root)
                self._st_dev[path] = os.fstat(fd).st_dev
                os.close(fd)
            except OSError:
                self._st_dev[path] = None
        return self._st_dev[path]

    def desired(self, spec: VmSpec, *, pid: int, cached: bool = False,
                all_hugetlbfs: bool = False, dev_sb: int | None = None
                ) -> tuple[Desired, list[Skipped]]:
        """``cached``: reuse host lookups across calls (one reconnect run); the
        skipped-device warnings then go into each VM's report, not the log.
        ``all_hugetlbfs``: a per-domain dir in every hugetlbfs mount (reconnect),
        not only in those of the page sizes the spec asks for.  ``dev_sb``: st_dev of
        the /dev tmpfs nsmount built for the VM at launch (None: unknown)."""
        resolved, skipped = resolve_spec(spec, cache=self._resolved if cached else None,
                                         quiet=cached)
        entries = flatten_entries([r.entries for r in resolved])
        dirs: tuple[tuple[str, str], ...] = ()
        if all_hugetlbfs or spec.wants_hugepages:
            dirs = hugepage_dirs_for(self.hugetlbfs, effective_id(spec, pid),
                                     effective_name(spec),
                                     (0,) if all_hugetlbfs else spec.hugepages)
        return Desired(entries=entries, mounts=self.vm_mounts(spec), hugepage_dirs=dirs,
                       uid=spec.uid, gid=spec.gid,
                       host_mounts=tuple(self.tree.visible()),
                       host_devs=self.mount_devs, host_dirs=all_hugetlbfs, dev_sb=dev_sb,
                       gone=tuple(s.request.path for s in skipped
                                  if s.reason == MISSING_ON_HOST)), skipped

    @property
    def mount_devs(self) -> frozenset[int]:
        """st_dev of every superblock mounted in the host namespace (hidden ones too)."""
        if self._mount_devs is None:
            self._mount_devs = frozenset(os.makedev(m.major, m.minor) for m in self.tree.mounts)
        return self._mount_devs


def effective_id(spec: VmSpec, pid: int) -> int:
    """libvirt's runtime id when known; else the QEMU pid (unique while it runs)."""
    return spec.domain_id if spec.domain_id is not None else pid


def effective_name(spec: VmSpec) -> str:
    return spec.name or "vm"
