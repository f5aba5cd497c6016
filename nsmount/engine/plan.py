"""The pure planner: "what is" + "what should be" -> [Action].

Nothing here touches the system, so every rule is unit-tested without root, and
``--dry-run`` is simply "plan, print, stop"; idempotence is "the plan is empty".
"""

from __future__ import annotations

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
    ReplayMount,
    SealNamespace,
    StackDev,
    SwapDev,
    SwitchDev,
)
from ..model.devnode import Entry
from ..model.display import escape_name
from ..model.hostmounts import HostMount
from ..model.mountinfo import Mount
from ..model.paths import components, is_strictly_within, is_within
from ..model.shortname import hugepage_dir

DEV = "/dev"


# ------------------------------------------------------------------ desired
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


def flatten_entries(chains: list[tuple[Entry, ...]]) -> tuple[Entry, ...]:
    """All entries of all chains, de-duplicated by path, first occurrence wins."""
    seen: dict[str, Entry] = {}
    for chain in chains:
        for e in chain:
            seen.setdefault(e.path, e)
    return tuple(seen.values())


def parent_dirs(entries: tuple[Entry, ...], *, skip: tuple[str, ...] = ()) -> list[str]:
    """Directories strictly between /dev and each entry, parents first."""
    dirs: dict[str, None] = {}
    for e in entries:
        parts = components(e.path)[1:-1]
        for i in range(1, len(parts) + 1):
            d = "/dev/" + "/".join(parts[:i])
            if not any(is_within(d, s) for s in skip):
                dirs.setdefault(d)
    return list(dirs)


def in_submount(path: str, submounts: tuple[str, ...]) -> bool:
    """True when ``path`` lies inside a preserved submount (whose content is the host's)."""
    return any(is_strictly_within(path, s) for s in submounts)


def hugepage_dirs_for(mounts: tuple[HostMount, ...] | list[HostMount], domain_id: int,
                      name: str, sizes: tuple[int, ...] = (0,)) -> tuple[tuple[str, str], ...]:
    """Per-domain dirs in every hugetlbfs mount whose page size is wanted (0 = any)."""
    out = []
    for m in mounts:
        if m.fstype != "hugetlbfs":
            continue
        if 0 not in sizes and m.pagesize is not None and m.pagesize // 1024 not in sizes:
            continue
        out.append((m.path, hugepage_dir(m.path, domain_id, name)))
    return tuple(out)


def _populate(entries: tuple[Entry, ...], submounts: tuple[str, ...]) -> list[Action]:
    acts: list[Action] = []
    mine = tuple(e for e in entries if not in_submount(e.path, submounts)
                 and is_strictly_within(e.path, DEV))
    for d in parent_dirs(mine, skip=submounts):
        acts.append(MakeDir(d))
    for s in submounts:
        acts.append(MakeDir(s, reason="mount point of a preserved submount"))
    for e in mine:
        if e.kind == "lnk":
            acts.append(MakeSymlink(e.path, e.target or ""))
        elif e.kind == "dir":
            acts.append(MakeDir(e.path, e.mode, e.uid, e.gid))
        else:
            acts.append(MakeNode(e))
    # de-duplicate MakeDir (a submount mount point may also be a parent dir)
    seen: set[str] = set()
    out: list[Action] = []
    for a in acts:
        if isinstance(a, MakeDir):
            if a.path in seen:
                continue
            seen.add(a.path)
        out.append(a)
    return out


# ------------------------------------------------------------------ launch
def plan_launch(desired: Desired, submounts: tuple[str, ...], *,
                rootless: bool = False) -> list[Action]:
    """Actions that build a VM's /dev in a freshly unshared namespace (``rootless``: in
    a user namespace of the caller's own, see :func:`plan_launch_rootless`)."""
    if rootless:
        return plan_launch_rootless(desired, submounts)
    acts: list[Action] = [CreateDevTmpfs()]
    acts += _populate(desired.entries, submounts)
    acts += [PreserveMount(s) for s in submounts]
    acts.append(SwitchDev(submounts))
    for mount, path in desired.hugepage_dirs:
        acts.append(MakeHugepageDir(mount, path, desired.uid, desired.gid))
    return acts



PTS = "/dev/pts"
PTMX = "/dev/ptmx"


def plan_launch_rootless(desired: Desired, submounts: tuple[str, ...]) -> list[Action]:
    """The same /dev in a user namespace, where mknod is refused and the host's /dev
    cannot be unmounted: directories owned by the caller, symlinks as usual, a new
    devpts instance at /dev/pts with /dev/ptmx -> pts/ptmx, the tmpfs stacked on the old
    /dev, each device node a bind of the host's node onto an empty file, then the
    per-domain hugepage dirs, and last a nested user namespace that locks it all.
    ``desired`` holds only nodes the caller may open (the face filters them)."""
    uid, gid = desired.uid, desired.gid
    keep = tuple(s for s in submounts if s != PTS)
    skip = (*keep, PTS)
    mine = tuple(e for e in desired.entries if not in_submount(e.path, skip)
                 and is_strictly_within(e.path, DEV))
    acts: list[Action] = [CreateDevTmpfs()]
    dirs: dict[str, str] = {}
    for d in parent_dirs(mine, skip=skip):
        dirs.setdefault(d, "")
    for s in (*keep, PTS):
        dirs.setdefault(s, "mount point of a preserved submount" if s != PTS
                        else "mount point of the new devpts instance")
    for e in mine:
        if e.kind == "dir":
            dirs.setdefault(e.path, "")
    acts += [MakeDir(d, 0o755, uid, gid, reason=why) for d, why in dirs.items()]
    nodes: list[Entry] = []
    for e in mine:
        if e.path == PTMX:  # the new devpts instance's own ptmx (as bubblewrap does)
            acts.append(MakeSymlink(PTMX, "pts/ptmx", reason="ptmx of the new devpts"))
        elif e.kind == "lnk":
            acts.append(MakeSymlink(e.path, e.target or ""))
        elif e.is_device:
            nodes.append(e)
    acts += [PreserveMount(s) for s in keep]
    acts.append(StackDev(keep))
    acts.append(MountDevpts(PTS))
    acts += [BindNode(e) for e in nodes]
    for mount, path in desired.hugepage_dirs:
        acts.append(MakeHugepageDir(mount, path, uid, gid))
    acts.append(SealNamespace(uid, gid))
    return acts

# ------------------------------------------------------------------ observed
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


@dataclass(frozen=True)
class Drift:
    kind: str  # missing-node, wrong-node, wrong-attrs, missing-mount, private-mount, ...
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


def _attrs_differ(want: Entry, have: Entry) -> bool:
    return (want.mode, want.uid, want.gid) != (have.mode, have.uid, have.gid)


def foreign_dev(desired: Desired, observed: Observed) -> str:
    """Why the VM's /dev is not a place nsmount may write into ('' when it is).

    Only the VM's own private tmpfs qualifies: the one recorded at launch, or, for a VM
    nsmount did not launch, a tmpfs mounted at /dev whose superblock is mounted nowhere
    in the host namespace.  Anything else (a bind of a host directory, the host's own
    /dev, the root filesystem's /dev directory after ``umount -l /dev``, a ramfs) is a
    view of something that is not the VM's: writing there would write on the host.
    """
    if observed.dev_id is None:
        return f"/dev cannot be used ({observed.dev_fstype})"
    if observed.dev_fstype != "tmpfs":
        return f"/dev is a {observed.dev_fstype}, not the VM's private tmpfs"
    if not observed.dev_mount_root:
        return "/dev is a directory of another filesystem, not a mount of its own"
    if desired.dev_sb is not None:
        if observed.dev_id != desired.dev_sb:
            return "/dev is not the tmpfs nsmount built at launch"
        return ""
    if observed.dev_id in desired.host_devs:
        return "/dev is a tmpfs that is also mounted in the host namespace"
    return ""


def diff(desired: Desired, observed: Observed) -> tuple[list[Drift], list[Action]]:
    """Compare and plan the repair.  Returns (drifts, actions)."""
    drifts: list[Drift] = []
    acts: list[Action] = []
    not_ours = foreign_dev(desired, observed)
    if not_ours:
        drifts.append(Drift("foreign-dev", DEV, f"{not_ours}: nsmount writes nothing "
                            "there (repair --rebuild-dev replaces it)", fixable=False))

    # 1. mounts that became private though their host counterpart propagates
    host_by_key = {(m.mountpoint, m.dev, m.root): m for m in desired.host_mounts}
    for m in observed.tree:
        h = host_by_key.get((m.mountpoint, m.dev, m.root))
        if h is None or m.propagation != "private" or h.propagation == "private":
            continue
        if h.propagation == "unbindable":
            continue
        d = Drift("private-mount", m.mountpoint,
                  f"private in the VM, {h.propagation} on the host: host mounts stop arriving")
        drifts.append(d)
        acts.append(RelinkMount(m.mountpoint, reason=d.describe()))

    # 2. /dev entries (none at all in a /dev that is not the VM's own)
    submounts = tuple(h.path for h in desired.mounts if h.under_dev)
    mine = tuple(e for e in desired.entries if not in_submount(e.path, submounts)
                 and not not_ours)
    for d_path in parent_dirs(mine, skip=submounts):
        have = observed.entries.get(d_path)
        if d_path in observed.unsafe:
            drifts.append(Drift("unsafe-path", d_path, observed.unsafe[d_path]))
        if have is None:
            if d_path in observed.entries:
                drifts.append(Drift("missing-dir", d_path, "directory missing"))
                acts.append(MakeDir(d_path, reason="missing directory"))
        elif have.kind != "dir":
            dr = Drift("planted", d_path, f"expected a directory, found {have.describe()}")
            drifts.append(dr)
            acts.append(MakeDir(d_path, reason=dr.describe()))
    for want in mine:
        have = observed.entries.get(want.path)
        if want.path in observed.unsafe:
            drifts.append(Drift("unsafe-path", want.path, observed.unsafe[want.path]))
        if have is None:
            dr = Drift(f"missing-{'symlink' if want.kind == 'lnk' else 'node'}", want.path,
                       f"should be {want.describe()}")
            drifts.append(dr)
            acts.append(_create(want, False, dr))
            continue
        if want.kind == "lnk":
            if have.kind != "lnk" or have.target != want.target:
                dr = Drift("wrong-symlink", want.path,
                           f"is {have.describe()}, should be {want.describe()}")
                drifts.append(dr)
                acts.append(_create(want, True, dr))
            continue
        if have.kind != want.kind or (want.is_device and have.rdev != want.rdev):
            kind = "planted" if have.kind == "lnk" else "wrong-node"
            dr = Drift(kind, want.path, f"is {have.describe()}, should be {want.describe()}")
            drifts.append(dr)
            acts.append(_create(want, True, dr))
        elif _attrs_differ(want, have):
            dr = Drift("wrong-attrs", want.path,
                       f"is {have.describe()}, should be {want.describe()}")
            drifts.append(dr)
            acts.append(FixNode(want, reason=dr.describe()))

    # 3. mounts the VM must see
    for hm in desired.mounts:
        st = observed.mounts.get(hm.path)
        if st is None or st.state == "present":
            continue
        if st.state == "other":
            drifts.append(Drift("foreign-mount", hm.path, st.detail or
                                "another mount is visible here; not stacking on it",
                                fixable=False))
            continue
        kind = "hidden-mount" if st.detail.startswith("hidden") else "missing-mount"
        if st.state == "unsafe":
            kind = "planted"
        if st.state == "error":
            drifts.append(Drift("unobservable", hm.path, st.detail, fixable=False))
            continue
        creatable = hm.under_dev and not not_ours
        if not creatable and st.state in ("missing-mountpoint", "unsafe"):
            where = "in a /dev that is not the VM's own" if hm.under_dev else "outside /dev"
            drifts.append(Drift(kind, hm.path, f"mount point missing or planted {where}; "
                                "nsmount creates mount points only inside the VM's own "
                                "/dev tmpfs", fixable=False))
            continue
        dr = Drift(kind, hm.path, st.detail or f"host {hm.fstype} not visible in the VM")
        drifts.append(dr)
        acts.append(ReplayMount(hm.path, hm.fstype, hm.pagesize,
                                make_mountpoint=creatable, reason=dr.describe()))

    # 4. per-domain hugepage directories
    for mount, path in desired.hugepage_dirs:
        if observed.hugepage_dirs.get(path):
            continue
        dr = Drift("missing-hugepage-dir", path, "per-domain hugepage directory missing")
        drifts.append(dr)
        acts.append(MakeHugepageDir(mount, path, desired.uid, desired.gid, reason=dr.describe()))
    return drifts, acts


def _create(want: Entry, replace: bool, dr: Drift) -> Action:
    if want.kind == "lnk":
        return MakeSymlink(want.path, want.target or "", replace=replace, reason=dr.describe())
    if want.kind == "dir":
        return MakeDir(want.path, want.mode, want.uid, want.gid, reason=dr.describe())
    return MakeNode(want, replace=replace, reason=dr.describe())


def plan_rebuild(desired: Desired) -> list[Action]:
    """Rebuild /dev of a running VM in one atomic swap."""
    submounts = tuple(h.path for h in desired.mounts if h.under_dev)
    populate = tuple(_populate(desired.entries, submounts))
    acts: list[Action] = [SwapDev(populate, submounts, reason="--rebuild-dev")]
    for mount, path in desired.hugepage_dirs:
        acts.append(MakeHugepageDir(mount, path, desired.uid, desired.gid))
    return acts
