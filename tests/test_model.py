"""Models: canonical paths, specs, mountinfo trees, host mount selection."""

from __future__ import annotations

import pytest

from nsmount.errors import SpecError, UnsafePathError
from nsmount.model.hostmounts import dev_submounts, hugetlbfs_mounts, parse_size
from nsmount.model.mountinfo import MountTree, escape, parse, unescape
from nsmount.model.paths import canonical, is_within, join_link
from nsmount.state.record import Record
from nsmount.model.spec import VmSpec

MOUNTINFO = r"""27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
24 27 0:6 / /dev rw,relatime shared:2 - devtmpfs devtmpfs rw,mode=755
25 24 0:23 / /dev/shm rw,relatime shared:3 - tmpfs tmpfs rw
26 24 0:24 / /dev/pts rw,relatime shared:4 - devpts devpts rw,mode=600
29 26 0:26 / /dev/pts rw,relatime shared:5 - devpts devpts rw,mode=600
30 24 0:40 / /dev/hugepages rw,relatime shared:6 - hugetlbfs hugetlbfs rw,pagesize=2M
31 24 0:41 / /dev/hugepages1G rw,relatime shared:7 - hugetlbfs hugetlbfs rw,pagesize=1024M
32 27 0:42 / /mnt/a\040b rw master:1 - hugetlbfs none rw
40 27 0:50 / /dev rw,nosuid - tmpfs devfs rw,size=64k
41 24 0:51 / /dev/hugepages2 rw - hugetlbfs hugetlbfs rw,pagesize=2M
"""


def test_canonical_refuses_dotdot_and_relative() -> None:
    assert canonical("/dev//disk/./x") == "/dev/disk/x"
    for bad in ("/dev/../etc/passwd", "dev/null", "", "/dev/\0x"):
        with pytest.raises(UnsafePathError):
            canonical(bad)


def test_component_prefix_not_string_prefix() -> None:
    assert is_within("/dev/shm/x", "/dev/shm")
    assert not is_within("/dev/shmfoo", "/dev/shm")
    assert join_link("/dev/disk/by-id/x", "../../sda") == "/dev/sda"


def test_mountinfo_escapes_and_tree() -> None:
    mounts = parse(MOUNTINFO)
    assert mounts[7].mountpoint == "/mnt/a b" and mounts[7].propagation == "slave"
    assert unescape(escape("a b\nc\\d")) == "a b\nc\\d"
    tree = MountTree(mounts)
    vis = {m.mount_id for m in tree.visible()}
    # the old devtmpfs and everything under it is covered by the later /dev tmpfs (40)
    assert 40 in vis and 24 not in vis and 41 not in vis
    assert [m.mount_id for m in tree.at("/dev/pts")] == [26, 29]


def test_hugetlbfs_and_submounts_are_the_visible_ones() -> None:
    tree = MountTree(parse(MOUNTINFO.replace("40 27 0:50 / /dev rw,nosuid - tmpfs devfs "
                                             "rw,size=64k\n", "")))
    subs = [m.mountpoint for m in dev_submounts(tree)]
    assert subs == ["/dev/shm", "/dev/pts", "/dev/hugepages", "/dev/hugepages1G",
                    "/dev/hugepages2"]
    assert [m.mount_id for m in dev_submounts(tree) if m.mountpoint == "/dev/pts"] == [29]
    huge = {h.path: h.pagesize for h in hugetlbfs_mounts(tree, 2 << 20)}
    assert huge == {"/dev/hugepages": 2 << 20, "/dev/hugepages1G": 1 << 30,
                    "/dev/hugepages2": 2 << 20, "/mnt/a b": 2 << 20}
    assert parse_size("1024M") == 1 << 30 and parse_size("x") is None


def test_spec_parsing_and_errors() -> None:
    s = VmSpec.from_text('name="a"\nid=2\ndevices=["/dev/sda", {path="/dev/sdb", '
                         'optional=true}]\nhugepages=[2048, 1048576]\n')
    assert s.hugepages == (2048, 1048576)
    req = {r.path: r.required for r in s.all_device_requests()}
    assert req["/dev/sda"] and not req["/dev/sdb"] and not req["/dev/null"]
    assert VmSpec.from_text('{"name": "j", "hugepages": true}').hugepages == (0,)
    for bad in ('name=', 'devises=["/dev/sda"]', 'devices=["/dev/../etc"]', 'id=-1',
                'hugepages="yes"', '{"name": 1}', "[1,2]"):
        with pytest.raises(SpecError):
            VmSpec.from_text(bad)


def test_record_roundtrip() -> None:
    rec = Record(12, 345, VmSpec(name="x", domain_id=3).with_devices(["/dev/loop0"]),
                 ("/dev/pts",))
    back = Record.from_json(rec.to_json())
    assert back.pid == 12 and back.spec.devices == rec.spec.devices
    assert back.spec.source == "record"
    with pytest.raises(SpecError):
        Record.from_json("{}")
