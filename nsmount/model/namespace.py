"""What a VM's namespace should hold and what it holds: the values the planner compares.

:class:`Desired` is computed on the host (``engine.hoststate``), :class:`Observed` from
inside the VM (``engine.observe``); :func:`nsmount.engine.plan.diff` turns the two into
:class:`Drift` and actions.  Plain data: nothing here touches the system.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .devnode import Entry
from .display import escape_name
from .hostmounts import HostMount
from .mountinfo import Mount


@dataclass(frozen=True)
class Desired:
    """What one VM's namespace should hold, resolved against the host."""

    entries: tuple[Entry, ...]          # nodes and symlinks under /dev, parents first
    mounts: tuple[HostMount, ...]       # host mounts the VM must see
    hugepage_dirs: tuple[tuple[str, str], ...] = ()  # (mount point, per-domain dir)
    uid: int = 0
    gid: int = 0
    host_mounts: tuple[Mount, ...] = ()  # the host's visible mounts, for re-linking
    #: st_dev of the /dev tmpfs nsmount built at launch (None: VM not launched by it)
    dev_sb: int | None = None
    #: st_dev of every mount in the host namespace: a VM /dev on one of these
    #: superblocks is (a view of) a host filesystem, never the VM's own tmpfs
    host_devs: frozenset[int] = frozenset()
    #: the per-domain hugepage dirs must exist on the host side too (reconnect: what
    #: libvirt looks for after a daemon restart)
    host_dirs: bool = False
    #: optional device paths of the spec that the host has no node at: a node the VM
    #: still has there is stale (its major:minor may name another device tomorrow)
    gone: tuple[str, ...] = ()


@dataclass(frozen=True)
class MountState:
    """How a host mount looks from inside the VM."""

    path: str
    state: str  # present | missing | missing-mountpoint | other | unsafe
    detail: str = ""


@dataclass
class Observed:
    """What the VM really sees, gathered from inside its namespace."""

    dev_fstype: str = "tmpfs"
    dev_id: int | None = None  # st_dev of what the VM sees at /dev
    dev_mount_root: bool = True  # /dev is a mount of its own (not a directory of /)
    entries: dict[str, Entry | None] = field(default_factory=dict)
    unsafe: dict[str, str] = field(default_factory=dict)  # path -> what was planted
    mounts: dict[str, MountState] = field(default_factory=dict)
    tree: tuple[Mount, ...] = ()  # the namespace's visible mounts
    hidden: tuple[Mount, ...] = ()  # listed in its mountinfo, covered by another mount
    hugepage_dirs: dict[str, bool] = field(default_factory=dict)  # path -> exists
    #: the same per-domain dirs, looked at on the host (only when Desired.host_dirs)
    host_hugepage_dirs: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Drift:
    kind: str  # missing-node, wrong-node, stale-node, wrong-attrs, missing-mount, ...
    path: str
    detail: str
    #: False when nsmount will not fix it by itself (a foreign mount it won't stack on,
    #: a mount point it won't create outside /dev): the run then reports failure
    fixable: bool = True

    def describe(self) -> str:
        return f"{self.kind}: {escape_name(self.path)}: {self.detail}"

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "path": self.path, "detail": self.detail,
                "fixable": self.fixable}
