"""Launch planning without root: hostfacts.resolve on a fake host root, HostState from a
fake mount table, plan_launch and launcher.prepare.

Device nodes cannot be made without root, so the fake ``/dev`` holds regular files and
``resolve(..., allow_non_device=True)`` (or a patched ``hostfacts.resolve`` doing the
same) stands in; the structure (links, their order, what leaves /dev) is what is tested.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from nsmount.engine import hostfacts

from nsmount.faces import launcher
from nsmount.engine.actions import (CreateDevTmpfs, MakeDir, MakeHugepageDir, MakeNode, MakeSymlink,
                             PreserveMount, SwitchDev)
from nsmount.errors import DeviceMissingError, SpecError, UnsafePathError
from nsmount.engine.hostfacts import resolve, resolve_spec
from nsmount.engine.hoststate import HostState, effective_id, effective_name
from nsmount.model.hostmounts import HostMount, dev_submounts, hugetlbfs_mounts
from nsmount.model.mountinfo import MountTree
from nsmount.model.spec import DeviceRequest, VmSpec
from nsmount.engine.plan import plan_launch

_real_resolve = hostfacts.resolve


# ------------------------------------------------------------------ fake host root
@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake host: /dev with files standing in for nodes, by-id links, a /run detour."""
    r = tmp_path / "host"
    dev = r / "dev"
    for d in ("disk/by-id", "disk/by-path", "mapper", "dm", "pts", "shm"):
        (dev / d).mkdir(parents=True)
    for f in ("null", "zero", "sda", "loop0", "loop1", "dm/vg-lv", "pts/ptmx"):
        (dev / f).write_text("")
        os.chmod(dev / f, 0o640)
    (dev / "disk/by-id/virtio-x").symlink_to("../../loop1")
    (dev / "disk/by-id/virtio-y").symlink_to("../../sda")
    (dev / "disk/by-path/pci-y").symlink_to("../by-id/virtio-y")        # two hops
    (dev / "disk/by-id/abs").symlink_to("/dev/sda")                     # absolute target
    (dev / "mapper/lv").symlink_to("../dm/vg-lv")
    (dev / "vg").symlink_to("mapper")                                   # directory link
    (dev / "ptmx").symlink_to("pts/ptmx")
    (dev / "a").symlink_to("b")                                         # loop
    (dev / "b").symlink_to("a")
    (dev / "dangling").symlink_to("nothere")
    (dev / "evil").symlink_to("../etc/passwd")
    (dev / "evil-abs").symlink_to("/etc/passwd")
    (r / "etc").mkdir()
    (r / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (r / "run/vg").mkdir(parents=True)
    (r / "run/vg/lv").symlink_to("../../dev/dm/vg-lv")                  # leaves /dev, returns
    (dev / "via-run").symlink_to("../run/vg/lv")
    return r


def R(root: Path, path: str) -> tuple[tuple[str, str, str | None], ...]:
    """resolve() as (path, kind, link target) triples."""
    return tuple((e.path, e.kind, e.target)
                 for e in resolve(path, root=str(root), allow_non_device=True))


# ------------------------------------------------------------------ resolve
def test_plain_entry(root: Path) -> None:
    (e,) = resolve("/dev/sda", root=str(root), allow_non_device=True)
    st = os.lstat(root / "dev/sda")
    assert (e.path, e.kind, e.mode, e.uid, e.gid) == ("/dev/sda", "reg", 0o640, st.st_uid,
                                                      st.st_gid)


def test_non_device_refused_by_default(root: Path) -> None:
    with pytest.raises(DeviceMissingError, match="not a device node"):
        resolve("/dev/sda", root=str(root))


def test_symlink_chain_keeps_every_link_then_the_node(root: Path) -> None:
    assert R(root, "/dev/disk/by-id/virtio-x") == (
        ("/dev/disk/by-id/virtio-x", "lnk", "../../loop1"),
        ("/dev/loop1", "reg", None))
    assert R(root, "/dev/disk/by-path/pci-y") == (
        ("/dev/disk/by-path/pci-y", "lnk", "../by-id/virtio-y"),
        ("/dev/disk/by-id/virtio-y", "lnk", "../../sda"),
        ("/dev/sda", "reg", None))


def test_absolute_link_target_is_taken_from_the_fake_root(root: Path) -> None:
    assert R(root, "/dev/disk/by-id/abs") == (("/dev/disk/by-id/abs", "lnk", "/dev/sda"),
                                              ("/dev/sda", "reg", None))


def test_directory_symlink_in_the_middle(root: Path) -> None:
    assert R(root, "/dev/vg/lv") == (
        ("/dev/vg", "lnk", "mapper"),
        ("/dev/mapper/lv", "lnk", "../dm/vg-lv"),
        ("/dev/dm/vg-lv", "reg", None))


def test_links_outside_dev_are_followed_not_reproduced(root: Path) -> None:
    assert R(root, "/dev/via-run") == (("/dev/via-run", "lnk", "../run/vg/lv"),
                                       ("/dev/dm/vg-lv", "reg", None))


def test_redundant_slashes_and_dots_are_canonicalised(root: Path) -> None:
    assert R(root, "/dev//disk/./by-id/virtio-x") == R(root, "/dev/disk/by-id/virtio-x")


@pytest.mark.parametrize("path", ["/dev/evil", "/dev/evil-abs", "/etc/passwd"])
def test_leaving_dev_is_unsafe(root: Path, path: str) -> None:
    with pytest.raises(UnsafePathError, match="outside /dev"):
        resolve(path, root=str(root), allow_non_device=True)


@pytest.mark.parametrize("path", ["/dev/../etc/passwd", "dev/sda", "", "/dev/sd\0a"])
def test_bad_request_paths(root: Path, path: str) -> None:
    with pytest.raises(UnsafePathError):
        resolve(path, root=str(root), allow_non_device=True)


def test_symlink_loop(root: Path) -> None:
    with pytest.raises(UnsafePathError, match="loop") as ei:
        resolve("/dev/a", root=str(root), allow_non_device=True)
    assert ei.value.exit_code == 4


def test_symlink_loop_in_a_directory_component(root: Path) -> None:
    with pytest.raises(UnsafePathError, match="loop"):
        resolve("/dev/a/x", root=str(root), allow_non_device=True)


@pytest.mark.parametrize("path", ["/dev/nothing", "/dev/dangling", "/dev/disk/nothing/x"])
def test_missing(root: Path, path: str) -> None:
    with pytest.raises(FileNotFoundError):
        resolve(path, root=str(root), allow_non_device=True)


def test_resolve_reads_nothing_outside_root(root: Path, tmp_path: Path) -> None:
    # /dev/sda exists on many real hosts; here it must come from the fake root only
    (root / "dev/only-here").write_text("")
    assert R(root, "/dev/only-here") == (("/dev/only-here", "reg", None),)
    with pytest.raises(FileNotFoundError):
        resolve("/dev/only-here", root=str(tmp_path / "empty"), allow_non_device=True)


# ------------------------------------------------------------------ resolve_spec
def fake_resolve(root: Path) -> Any:
    """hostfacts.resolve pinned to the fake root, accepting files as nodes."""

    def wrapper(path: str, **kw: Any) -> Any:
        return _real_resolve(path, root=str(root), allow_non_device=True)

    return wrapper


def test_resolve_spec_optional_defaults_are_skipped(root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    spec = VmSpec(devices=(DeviceRequest("/dev/disk/by-id/virtio-x"),))
    ok, skipped = resolve_spec(spec)
    assert [r.request.path for r in ok] == ["/dev/null", "/dev/zero", "/dev/ptmx",
                                            "/dev/disk/by-id/virtio-x"]
    assert {s.request.path: s.reason for s in skipped} == {
        "/dev/full": "does not exist on the host", "/dev/random": "does not exist on the host",
        "/dev/urandom": "does not exist on the host", "/dev/kvm": "does not exist on the host"}
    assert [e.path for e in ok[-1].entries] == ["/dev/disk/by-id/virtio-x", "/dev/loop1"]


def test_resolve_spec_required_missing_is_device_missing(root: Path) -> None:
    spec = VmSpec(devices=(DeviceRequest("/dev/nope"),), default_devices=())
    with pytest.raises(DeviceMissingError, match="/dev/nope") as ei:
        resolve_spec(spec, root=str(root))
    assert ei.value.exit_code == 5


def test_resolve_spec_required_non_device(root: Path) -> None:
    spec = VmSpec(devices=(DeviceRequest("/dev/sda"),), default_devices=())
    with pytest.raises(DeviceMissingError, match="not a device"):
        resolve_spec(spec, root=str(root))


def test_resolve_spec_optional_non_device_is_skipped(root: Path) -> None:
    spec = VmSpec(devices=(DeviceRequest("/dev/sda", required=False),), default_devices=())
    ok, skipped = resolve_spec(spec, root=str(root))
    assert ok == [] and len(skipped) == 1 and "not a device" in skipped[0].reason


@pytest.mark.parametrize("path", ["/dev/evil", "/dev/a"])
def test_resolve_spec_unsafe(root: Path, path: str) -> None:
    spec = VmSpec(devices=(DeviceRequest(path),), default_devices=())
    with pytest.raises(UnsafePathError) as ei:
        resolve_spec(spec, root=str(root))
    assert ei.value.exit_code == 4
    ok, skipped = resolve_spec(VmSpec(devices=(DeviceRequest(path, False),),
                                      default_devices=()), root=str(root))
    assert ok == [] and [s.request.path for s in skipped] == [path]


def test_required_wins_over_optional_default() -> None:
    spec = VmSpec(devices=(DeviceRequest("/dev/null"),))
    reqs = {r.path: r.required for r in spec.all_device_requests()}
    assert reqs["/dev/null"] is True and reqs["/dev/zero"] is False
    assert next(iter(reqs)) == "/dev/null"


def test_spec_paths_are_checked_when_parsed() -> None:
    with pytest.raises(UnsafePathError):
        VmSpec.from_text('devices = ["/dev/../etc/shadow"]')
    with pytest.raises(SpecError):
        VmSpec.from_text('name = "x"\nid = \n')


# ------------------------------------------------------------------ HostState
MOUNTINFO = """\
20 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
21 20 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=10k,mode=755
22 21 0:20 / /dev/pts rw,nosuid shared:3 - devpts devpts rw,mode=620,ptmxmode=000
23 21 0:21 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw
24 21 0:22 / /dev/hugepages rw,relatime shared:5 - hugetlbfs hugetlbfs rw,pagesize=2M
25 24 0:23 / /dev/hugepages/nested rw,relatime shared:6 - tmpfs tmpfs rw
26 20 0:24 / /mnt/huge1G rw,relatime shared:7 - hugetlbfs hugetlbfs rw,pagesize=1024M
27 20 0:25 / /srv/images rw,relatime shared:8 - xfs /dev/sdb1 rw
28 23 0:26 / /dev/shm rw,relatime shared:9 - tmpfs other rw
"""


def host_state() -> HostState:
    tree = MountTree.from_text(MOUNTINFO)
    ps = 2 << 20
    subs = tuple(HostMount.from_mount(m, ps) for m in dev_submounts(tree))
    return HostState(tree, subs, tuple(hugetlbfs_mounts(tree, ps)))


def test_host_state_submounts_and_hugetlbfs() -> None:
    hs = host_state()
    assert sorted(h.path for h in hs.submounts) == ["/dev/hugepages", "/dev/pts", "/dev/shm"]
    shm = next(h for h in hs.submounts if h.path == "/dev/shm")
    assert shm.dev == (0, 26), "the visible (top) /dev/shm, not the covered one"
    assert [(h.path, h.pagesize) for h in hs.hugetlbfs] == [("/dev/hugepages", 2 << 20),
                                                             ("/mnt/huge1G", 1 << 30)]


def test_desired_from_host_state(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    spec = VmSpec(name="guest", domain_id=5,
                  devices=(DeviceRequest("/dev/disk/by-path/pci-y"),
                           DeviceRequest("/dev/disk/by-id/virtio-y")),
                  default_devices=("/dev/null", "/dev/ptmx", "/dev/kvm"),
                  hugepages=(0,), mounts=("/srv/images/",), uid=107, gid=36)
    d, skipped = host_state().desired(spec, pid=4242)
    assert [s.request.path for s in skipped] == ["/dev/kvm"]
    # chains flattened, de-duplicated (virtio-y reached twice), first occurrence first
    assert [e.path for e in d.entries] == [
        "/dev/null", "/dev/ptmx", "/dev/pts/ptmx", "/dev/disk/by-path/pci-y",
        "/dev/disk/by-id/virtio-y", "/dev/sda"]
    # /dev submounts, then hugetlbfs elsewhere, then configured mount points
    assert [m.path for m in d.mounts][3:] == ["/mnt/huge1G", "/srv/images"]
    assert sorted(m.path for m in d.mounts[:3]) == ["/dev/hugepages", "/dev/pts", "/dev/shm"]
    assert d.hugepage_dirs == (
        ("/dev/hugepages", "/dev/hugepages/libvirt/qemu/5-guest"),
        ("/mnt/huge1G", "/mnt/huge1G/libvirt/qemu/5-guest"))
    assert (d.uid, d.gid) == (107, 36)


def test_desired_hugepage_size_filter_and_pid_fallback(root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    spec = VmSpec(default_devices=(), hugepages=(1048576,))
    d, _ = host_state().desired(spec, pid=4242)
    assert d.hugepage_dirs == (("/mnt/huge1G", "/mnt/huge1G/libvirt/qemu/4242-vm"),)
    assert effective_id(spec, 4242) == 4242 and effective_name(spec) == "vm"
    d, _ = host_state().desired(VmSpec(default_devices=()), pid=1)
    assert d.hugepage_dirs == () and d.entries == ()


def test_long_name_is_cut_like_libvirt(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    spec = VmSpec(name="a" * 30, domain_id=12, default_devices=(), hugepages=(2048,))
    d, _ = host_state().desired(spec, pid=1)
    assert d.hugepage_dirs == (("/dev/hugepages", "/dev/hugepages/libvirt/qemu/12-" + "a" * 20),)


# ------------------------------------------------------------------ plan_launch / prepare
def test_prepare_plans_the_whole_launch(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    spec = VmSpec(name="guest", domain_id=5, devices=(DeviceRequest("/dev/vg/lv"),),
                  default_devices=("/dev/null", "/dev/ptmx"), hugepages=(0,), uid=107, gid=36)
    lp = launcher.prepare(spec, pid=99, host=host_state())
    assert sorted(lp.submounts) == ["/dev/hugepages", "/dev/pts", "/dev/shm"]
    acts = lp.actions
    assert acts[0] == CreateDevTmpfs()
    kinds = [type(a) for a in acts]
    sw = kinds.index(SwitchDev)
    assert acts[sw] == SwitchDev(lp.submounts)
    # everything inside the new /dev is prepared before the switch
    assert all(k in (MakeDir, MakeNode, MakeSymlink, PreserveMount) for k in kinds[1:sw])
    assert [a.path for a in acts if isinstance(a, PreserveMount)] == list(lp.submounts)
    # hugepage dirs come last, owned by the VM's user
    assert acts[sw + 1:] == [
        MakeHugepageDir("/dev/hugepages", "/dev/hugepages/libvirt/qemu/5-guest", 107, 36),
        MakeHugepageDir("/mnt/huge1G", "/mnt/huge1G/libvirt/qemu/5-guest", 107, 36)]
    # parents before children, each directory once
    dirs = [a.path for a in acts if isinstance(a, MakeDir)]
    assert len(dirs) == len(set(dirs))
    for path in ("/dev/mapper", "/dev/dm", "/dev/pts", "/dev/shm", "/dev/hugepages"):
        assert path in dirs, dirs
    pos = {getattr(a, "path", None) or getattr(getattr(a, "entry", None), "path", None): i
           for i, a in enumerate(acts)}
    assert pos["/dev/mapper"] < pos["/dev/mapper/lv"] and pos["/dev/dm"] < pos["/dev/dm/vg-lv"]
    links = {a.path: a.target for a in acts if isinstance(a, MakeSymlink)}
    assert links == {"/dev/ptmx": "pts/ptmx", "/dev/vg": "mapper",
                     "/dev/mapper/lv": "../dm/vg-lv"}
    nodes = [a.entry.path for a in acts if isinstance(a, MakeNode)]
    # /dev/pts/ptmx lives in the preserved devpts: not created, the host's is kept
    assert nodes == ["/dev/null", "/dev/dm/vg-lv"]


def test_plan_launch_without_submounts_or_hugepages(root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    hs = HostState(MountTree.from_text(MOUNTINFO.splitlines()[0] + "\n"), (), ())
    d, _ = hs.desired(VmSpec(default_devices=("/dev/null",), hugepages=(0,)), pid=3)
    assert d.hugepage_dirs == ()  # no hugetlbfs mounted: nothing to make
    acts = plan_launch(d, ())
    assert acts == [CreateDevTmpfs(), MakeNode(d.entries[0]), SwitchDev(())]


def test_prepare_is_deterministic(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    spec = VmSpec(name="g", domain_id=1, devices=(DeviceRequest("/dev/disk/by-path/pci-y"),))
    a = launcher.prepare(spec, pid=1, host=host_state()).actions
    b = launcher.prepare(spec, pid=1, host=host_state()).actions
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]


def test_prepare_raises_before_anything_for_bad_devices(root: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "resolve", fake_resolve(root))
    with pytest.raises(DeviceMissingError):
        launcher.prepare(VmSpec(devices=(DeviceRequest("/dev/nope"),)), pid=1,
                         host=host_state())
    with pytest.raises(UnsafePathError):
        launcher.prepare(VmSpec(devices=(DeviceRequest("/dev/evil"),)), pid=1,
                         host=host_state())
