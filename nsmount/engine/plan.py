"""The pure planner: "what is" + "what should be" -> [Action].

Nothing here touches the system, so every rule is unit-tested without root, and
``--dry-run`` is simply "plan, print, stop"; idempotence is "the plan is empty".
"""

from __future__ import annotations

import functools
from dataclasses import replace

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
from ..model.devnode import Entry
from ..model.hostmounts import HostMount
from ..model.mountinfo import Mount
from ..model.namespace import Desired, Drift, Observed
from ..model.paths import components, is_strictly_within, is_within
from ..model.shortname import hugepage_dir

DEV = "/dev"


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
            if d not in dirs and not any(is_within(d, s) for s in skip):
                dirs[d] = None
    return list(dirs)


@functools.lru_cache(maxsize=4096)
def in_submount(path: str, submounts: tuple[str, ...]) -> bool:
    """True when ``path`` lies inside a preserved submount (whose content is the host's).

    Cached: every VM of a worker asks it for the same few paths (the default nodes)
    and the same submounts, ~15 times a VM."""
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
    host_by_key: dict[tuple[str, tuple[int, int], str], Mount] | None = None
    for m in observed.tree:
        if m.propagation != "private":
            continue  # most are: the host's index is only built for a private one
        if host_by_key is None:
            host_by_key = {(h.mountpoint, h.dev, h.root): h for h in desired.host_mounts}
        h = host_by_key.get((m.mountpoint, m.dev, m.root))
        if h is None or h.propagation == "private":
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
    # optional devices the host has no node for any more: the VM's copy goes too (a
    # major:minor left behind may name another device once the kernel reuses it)
    for path in () if not_ours else desired.gone:
        have = observed.entries.get(path)
        if have is None or have.kind not in ("chr", "blk", "lnk") \
                or in_submount(path, submounts):
            continue
        dr = Drift("stale-node", path, f"is {have.describe()}; the host has no {path} any more")
        drifts.append(dr)
        acts.append(RemoveEntry(path, reason=dr.describe()))

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

    # 4. per-domain hugepage directories, on the host first (planned, shown by --dry-run,
    # applied in the host namespace before the VM is entered), then inside the VM
    for mount, path in desired.hugepage_dirs if desired.host_dirs else ():
        if observed.host_hugepage_dirs.get(path, True):
            continue
        dr = Drift("missing-hugepage-dir", path, "per-domain hugepage directory missing on "
                   "the host")
        drifts.append(dr)
        acts.append(MakeHugepageDir(mount, path, desired.uid, desired.gid, host=True,
                                    reason=dr.describe()))
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


#: what a hotplug (``device add``/``device remove``) may plan and report: /dev entries only
NODE_ACTIONS = (MakeDir, MakeNode, FixNode, MakeSymlink, RemoveEntry)
NODE_DRIFTS = frozenset({"missing-node", "missing-symlink", "missing-dir", "wrong-node",
                         "stale-node",
                         "wrong-symlink", "wrong-attrs", "planted", "unsafe-path",
                         "foreign-dev"})
#: what a rebuild reports besides the swap: the mounts the new /dev gets
MOUNT_DRIFTS = frozenset({"missing-mount", "hidden-mount", "private-mount", "foreign-mount",
                          "unobservable", "planted"})


def plan(desired: Desired, observed: Observed, *, mode: str = "repair",
         remove: tuple[str, ...] = (), rebuild: bool = False
         ) -> tuple[list[Drift], list[Action]]:
    """Everything nsmount will do to one VM, host-side steps included.

    ``mode``: ``repair`` (and ``inspect``) plans every drift; ``add`` only /dev entries
    (the desired spec holds just the new devices); ``remove`` unlinks ``remove`` (never
    in a /dev that is not the VM's own).  ``rebuild``: one atomic swap to a fresh /dev,
    then the mounts the old one lacked are replayed into the new one.
    """
    if rebuild:
        drifts, _ = diff(desired, observed)
        # plan as if /dev already were the fresh tmpfs the swap puts there
        fresh = replace(observed, dev_fstype="tmpfs", dev_id=0, dev_mount_root=True)
        drifts2, acts2 = diff(replace(desired, dev_sb=None, host_devs=frozenset()), fresh)
        acts: list[Action] = [a for a in acts2 if isinstance(a, MakeHugepageDir) and a.host]
        acts += plan_rebuild(desired) + [a for a in acts2
                                         if isinstance(a, (RelinkMount, ReplayMount))]
        return ([replace(d, fixable=True) for d in drifts if d.kind == "foreign-dev"]
                + [d for d in drifts2 if d.kind in MOUNT_DRIFTS]), acts
    drifts, acts = diff(desired, observed)
    if mode in ("add", "remove"):
        acts = [a for a in acts if isinstance(a, NODE_ACTIONS)]
        drifts = [d for d in drifts if d.kind in NODE_DRIFTS]
    if mode == "remove" and not foreign_dev(desired, observed):
        acts += [RemoveEntry(p, reason="hotplug remove") for p in remove]
    return drifts, acts
