"""The pure planner: each drift rule, ordering, idempotence.  No root needed."""

from __future__ import annotations

from nsmount.engine.actions import (FixNode, MakeDir, MakeHugepageDir, MakeNode, MakeSymlink,
                             PreserveMount, RelinkMount, RemoveEntry, ReplayMount, SwitchDev)
from nsmount.model.devnode import Entry
from nsmount.model.hostmounts import HostMount
from nsmount.model.mountinfo import parse_line
from nsmount.engine.plan import diff, plan_launch, plan_rebuild
from nsmount.model.namespace import Desired, MountState, Observed

NULL = Entry("/dev/null", "chr", 1, 3, 0o666)
LOOP = Entry("/dev/loop0", "blk", 7, 0, 0o660, 0, 6)
LINK = Entry("/dev/disk/by-id/x", "lnk", target="../../loop0")
SHM = HostMount("/dev/shm", "tmpfs", (0, 30), propagation="shared")
HUGE = HostMount("/dev/hugepages", "hugetlbfs", (0, 40), propagation="shared",
                 pagesize=2 << 20)
MNT_HUGE = HostMount("/mnt/huge", "hugetlbfs", (0, 41), pagesize=2 << 20)


def desired(**kw: object) -> Desired:
    base: dict[str, object] = dict(entries=(NULL, LINK, LOOP), mounts=(SHM, HUGE))
    base.update(kw)
    return Desired(**base)  # type: ignore[arg-type]


def clean_observed(d: Desired) -> Observed:
    obs = Observed(dev_id=99)  # a private tmpfs: mounted nowhere in the host
    for path in ("/dev/disk", "/dev/disk/by-id"):
        obs.entries[path] = Entry(path, "dir", mode=0o755)
    for e in d.entries:
        obs.entries[e.path] = e
    for h in d.mounts:
        obs.mounts[h.path] = MountState(h.path, "present")
    for _m, p in d.hugepage_dirs:
        obs.hugepage_dirs[p] = True
    return obs


def test_launch_plan_order() -> None:
    acts = plan_launch(desired(), ("/dev/pts", "/dev/shm"))
    names = [a.name for a in acts]
    assert names[0] == "CreateDevTmpfs"
    # parents before children, nodes before the switch, preserved mounts before the switch
    dirs = [a.path for a in acts if isinstance(a, MakeDir)]
    assert dirs.index("/dev/disk") < dirs.index("/dev/disk/by-id")
    assert "/dev/pts" in dirs and "/dev/shm" in dirs
    assert isinstance(acts[-1], SwitchDev)
    assert acts[-1].preserved == ("/dev/pts", "/dev/shm")
    assert [a.path for a in acts if isinstance(a, PreserveMount)] == ["/dev/pts", "/dev/shm"]
    assert any(isinstance(a, MakeSymlink) and a.target == "../../loop0" for a in acts)


def test_launch_plan_skips_entries_inside_submounts() -> None:
    inside = Entry("/dev/shm/disk", "blk", 8, 0, 0o600)
    acts = plan_launch(desired(entries=(NULL, inside)), ("/dev/shm",))
    assert not any(isinstance(a, MakeNode) and a.entry.path == "/dev/shm/disk" for a in acts)


def test_launch_plan_hugepage_dirs_after_switch() -> None:
    d = desired(hugepage_dirs=(("/dev/hugepages", "/dev/hugepages/libvirt/qemu/1-a"),))
    acts = plan_launch(d, ())
    assert isinstance(acts[-1], MakeHugepageDir)


def test_clean_namespace_plans_nothing() -> None:
    d = desired(hugepage_dirs=(("/dev/hugepages", "/dev/hugepages/libvirt/qemu/1-a"),))
    drifts, acts = diff(d, clean_observed(d))
    assert drifts == [] and acts == []


def test_missing_node_and_wrong_attrs() -> None:
    d = desired()
    obs = clean_observed(d)
    obs.entries["/dev/null"] = None
    obs.entries["/dev/loop0"] = Entry("/dev/loop0", "blk", 7, 0, 0o600, 0, 6)
    drifts, acts = diff(d, obs)
    assert {x.kind for x in drifts} == {"missing-node", "wrong-attrs"}
    assert any(isinstance(a, MakeNode) and a.entry == NULL and not a.replace for a in acts)
    assert any(isinstance(a, FixNode) and a.entry.path == "/dev/loop0" for a in acts)


def test_wrong_rdev_and_planted_symlink_are_replaced() -> None:
    d = desired()
    obs = clean_observed(d)
    obs.entries["/dev/loop0"] = Entry("/dev/loop0", "blk", 7, 9, 0o660, 0, 6)
    obs.entries["/dev/null"] = Entry("/dev/null", "lnk", target="/etc/shadow")
    drifts, acts = diff(d, obs)
    kinds = {x.path: x.kind for x in drifts}
    assert kinds == {"/dev/loop0": "wrong-node", "/dev/null": "planted"}
    assert all(isinstance(a, MakeNode) and a.replace for a in acts)


def test_wrong_symlink_target() -> None:
    d = desired()
    obs = clean_observed(d)
    obs.entries[LINK.path] = Entry(LINK.path, "lnk", target="/etc")
    _, acts = diff(d, obs)
    assert acts == [MakeSymlink(LINK.path, "../../loop0", replace=True)]


def test_missing_and_hidden_mounts_are_replayed_never_stacked() -> None:
    d = desired()
    obs = clean_observed(d)
    obs.mounts["/dev/shm"] = MountState("/dev/shm", "missing", "not mounted")
    obs.mounts["/dev/hugepages"] = MountState("/dev/hugepages", "missing-mountpoint",
                                              "hidden: listed in mountinfo but covered")
    drifts, acts = diff(d, obs)
    assert {x.kind for x in drifts} == {"missing-mount", "hidden-mount"}
    replays = [a for a in acts if isinstance(a, ReplayMount)]
    assert [a.path for a in replays] == ["/dev/shm", "/dev/hugepages"]
    assert replays[1].pagesize == 2 << 20 and replays[1].make_mountpoint
    obs.mounts["/dev/shm"] = MountState("/dev/shm", "other", "another fs")
    obs.mounts["/dev/hugepages"] = MountState("/dev/hugepages", "present")
    drifts, acts = diff(d, obs)
    assert [x.kind for x in drifts] == ["foreign-mount"] and acts == []


def test_mount_outside_dev_never_creates_a_mount_point() -> None:
    d = desired(mounts=(MNT_HUGE,))
    obs = clean_observed(d)
    obs.mounts["/mnt/huge"] = MountState("/mnt/huge", "missing-mountpoint")
    drifts, acts = diff(d, obs)
    assert acts == [] and drifts[0].path == "/mnt/huge"
    obs.mounts["/mnt/huge"] = MountState("/mnt/huge", "missing")
    _, acts = diff(d, obs)
    assert isinstance(acts[0], ReplayMount) and not acts[0].make_mountpoint


def test_private_mount_is_relinked_only_when_host_propagates() -> None:
    host_root = parse_line("1 0 254:0 / / rw shared:1 - ext4 /dev/vda rw")
    vm_root = parse_line("50 40 254:0 / / rw - ext4 /dev/vda rw")
    d = desired(host_mounts=(host_root,))
    obs = clean_observed(d)
    obs.tree = (vm_root,)
    drifts, acts = diff(d, obs)
    assert [x.kind for x in drifts] == ["private-mount"]
    assert acts == [RelinkMount("/")]
    private_host = parse_line("1 0 254:0 / / rw - ext4 /dev/vda rw")
    assert diff(desired(host_mounts=(private_host,)), obs) == ([], [])


def test_missing_hugepage_dir() -> None:
    d = desired(hugepage_dirs=(("/dev/hugepages", "/dev/hugepages/libvirt/qemu/3-b"),),
                uid=107, gid=107)
    obs = clean_observed(d)
    obs.hugepage_dirs["/dev/hugepages/libvirt/qemu/3-b"] = False
    _, acts = diff(d, obs)
    assert acts == [MakeHugepageDir("/dev/hugepages", "/dev/hugepages/libvirt/qemu/3-b",
                                    107, 107)]


def test_planted_parent_directory_is_replaced_by_a_directory() -> None:
    d = desired()
    obs = clean_observed(d)
    obs.entries["/dev/disk"] = Entry("/dev/disk", "lnk", target="/etc")
    obs.entries["/dev/disk/by-id"] = None
    obs.entries[LINK.path] = None
    obs.unsafe[LINK.path] = "a directory on the way is a symlink (not followed)"
    drifts, acts = diff(d, obs)
    assert isinstance(acts[0], MakeDir) and acts[0].path == "/dev/disk"
    assert any(x.kind == "unsafe-path" for x in drifts)


def test_rebuild_plan_is_one_swap() -> None:
    acts = plan_rebuild(desired())
    assert acts[0].name == "SwapDev"
    assert acts[0].preserved == ("/dev/shm", "/dev/hugepages")  # type: ignore[attr-defined]
    assert any(isinstance(a, MakeNode) for a in acts[0].populate)  # type: ignore[attr-defined]


def test_actions_serialise() -> None:
    for a in plan_launch(desired(), ("/dev/pts",)):
        d = a.to_dict()
        assert d["action"] == a.kind and isinstance(d["description"], str)


def test_dev_that_is_not_the_vms_own_is_never_written() -> None:
    """A bind of a host dir, the host's /dev, the root fs's /dev directory, a ramfs,
    a tmpfs other than the one recorded at launch: foreign-dev, no /dev action."""
    d = desired(host_devs=frozenset({5, 6}))
    cases = {
        "host tmpfs": dict(dev_id=5),
        "root fs directory": dict(dev_id=99, dev_mount_root=False),
        "ramfs": dict(dev_id=99, dev_fstype="ramfs"),
        "missing": dict(dev_id=None, dev_fstype="missing"),
    }
    for why, fields in cases.items():
        obs = Observed(**fields)  # type: ignore[arg-type]
        for h in d.mounts:
            obs.mounts[h.path] = MountState(h.path, "missing-mountpoint")
        drifts, acts = diff(d, obs)
        assert next(x.kind for x in drifts if not x.fixable) == "foreign-dev", why
        assert not [a for a in acts if isinstance(a, (MakeNode, MakeDir, MakeSymlink,
                                                      FixNode))], why
        # mount points are not created there either: unfixable, nothing planned
        assert not [a for a in acts if isinstance(a, ReplayMount)], why
    # recorded at launch: only that superblock is the VM's own
    rec = desired(dev_sb=42)
    obs = clean_observed(rec)
    obs.dev_id = 43
    assert diff(rec, obs)[0][0].kind == "foreign-dev"
    obs.dev_id = 42
    assert diff(rec, obs) == ([], [])


def test_optional_device_gone_from_the_host_leaves_the_vm() -> None:
    """An optional device the host has no node for any more: the VM's node (or link)
    there is removed; nothing else at that path is touched, and nothing at all in a
    /dev that is not the VM's own."""
    gone = Entry("/dev/loop6", "blk", 7, 6, 0o660, 0, 6)
    d = desired(gone=("/dev/loop6", "/dev/sdz", "/dev/odd"))
    obs = clean_observed(d)
    assert diff(d, obs) == ([], [])  # the VM does not have them either
    obs.entries["/dev/loop6"] = gone
    obs.entries["/dev/odd"] = Entry("/dev/odd", "dir", mode=0o755)
    drifts, acts = diff(d, obs)
    assert [(x.kind, x.path) for x in drifts] == [("stale-node", "/dev/loop6")]
    assert acts == [RemoveEntry("/dev/loop6")]
    obs.dev_id = None
    obs.dev_fstype = "ramfs"
    assert not [a for a in diff(d, obs)[1] if isinstance(a, RemoveEntry)]


def test_stacked_mounts_only_the_top_is_visible_and_relinked() -> None:
    from nsmount.model.mountinfo import MountTree, parse

    tree = MountTree(parse(
        "1 0 8:1 / / rw shared:1 - ext4 /dev/sda rw\n"
        "2 1 0:5 / /proc rw - proc proc rw\n"
        "3 2 0:5 / /proc rw - proc proc rw\n"
        "4 3 0:6 / /proc/sys/fs/binfmt_misc rw - autofs a rw\n"
        "5 4 0:7 / /proc/sys/fs/binfmt_misc rw - binfmt_misc b rw\n"))
    assert [m.mount_id for m in tree.visible()] == [1, 3, 5]
    assert [m.mount_id for m in tree.hidden()] == [2, 4]
    host = parse_line("9 1 0:5 / /proc rw shared:7 - proc proc rw")
    d = desired(host_mounts=(host,))
    obs = clean_observed(d)
    obs.tree = tuple(tree.visible())
    _drifts, acts = diff(d, obs)
    assert [a for a in acts if isinstance(a, RelinkMount)] == [RelinkMount("/proc")]


def test_host_side_hugepage_dirs_are_planned_first() -> None:
    """Reconnect makes the per-domain dirs on the host too: actions in the plan (so a
    dry run lists them and the crash suite reaches them), host side first."""
    dirs = (("/dev/hugepages", "/dev/hugepages/libvirt/qemu/1-a"),)
    d = desired(hugepage_dirs=dirs, host_dirs=True)
    obs = clean_observed(d)
    obs.host_hugepage_dirs = {"/dev/hugepages/libvirt/qemu/1-a": False}
    obs.hugepage_dirs = {"/dev/hugepages/libvirt/qemu/1-a": False}
    drifts, acts = diff(d, obs)
    assert [(type(a).__name__, getattr(a, "host", None)) for a in acts] == [
        ("MakeHugepageDir", True), ("MakeHugepageDir", False)]
    assert "host side" in acts[0].describe()
    assert [x.kind for x in drifts] == ["missing-hugepage-dir"] * 2
    # without host_dirs (repair of one VM) only the VM side is planned
    assert [a.host for a in diff(desired(hugepage_dirs=dirs), obs)[1]] == [False]
