"""libvirt's qemu.conf: the parser (pure) and the loader (file, names, defaults)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from nsmount.state import libvirtspec
from nsmount.model.qemu_conf import QemuConfError, parse_entries, parse_qemu_conf
from nsmount.model.spec import DEFAULT_DEVICES

DEBIAN_LIKE = """# Master configuration file for the QEMU driver.
#user = "libvirt-qemu"
user = "root"   # run as root
group = 'root'
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ "mount" ]
cgroup_device_acl = [
    "/dev/null", "/dev/full", "/dev/zero",   # the usual
    "/dev/random", "/dev/urandom",
    "/dev/ptmx", "/dev/kvm",
    "/dev/rtc","/dev/hpet",
]
hugetlbfs_mount = ["/dev/hugepages2M", "/dev/hugepages1G"]; max_files = 32768
"""


def test_parse_debian_like() -> None:
    c = parse_qemu_conf(DEBIAN_LIKE, "/etc/libvirt/qemu.conf")
    assert c.user == "root" and c.group == "root"
    assert c.cgroup_device_acl is not None and c.cgroup_device_acl[-2:] == ("/dev/rtc",
                                                                          "/dev/hpet")
    assert c.hugetlbfs_mount == ("/dev/hugepages2M", "/dev/hugepages1G")
    assert parse_entries(DEBIAN_LIKE)["max_files"] == (32768, 15)


def test_parse_defaults_and_single_hugetlbfs() -> None:
    c = parse_qemu_conf("hugetlbfs_mount = \"/mnt/huge\"\n")
    assert c.hugetlbfs_mount == ("/mnt/huge",)
    assert c.cgroup_device_acl is None and c.user is None
    assert parse_qemu_conf("").hugetlbfs_mount is None
    assert parse_qemu_conf("hugetlbfs_mount = \"\"").hugetlbfs_mount == ()
    assert parse_qemu_conf("cgroup_device_acl = []").cgroup_device_acl == ()


@pytest.mark.parametrize(("text", "line"), [
    ("user = root\n", 1),                                # unquoted string
    ("a = 1\nuser = \"root\n", 2),                        # unterminated string
    ("a = 1\n\ncgroup_device_acl = [ \"/dev/null\",\n  \"/dev/kvm\"\n", 3),
    ("a = 1\nb == 2\n", 2),
    ("user = \"x\" junk\n", 1),
    ("= 3\n", 1),
    ("cgroup_device_acl = [ [\"x\"] ]\n", 1),
    ("x = 1\ncgroup_device_acl = \"/dev/null\"\n", 2),   # must be a list
    ("user = 107\n", 1),                                 # must be a string
])
def test_malformed_names_file_and_line(text: str, line: int) -> None:
    with pytest.raises(QemuConfError) as info:
        parse_qemu_conf(text, "/etc/libvirt/qemu.conf")
    msg = str(info.value)
    assert msg.startswith(f"/etc/libvirt/qemu.conf:{line}: ") and "\n" not in msg


def test_loader_absent_malformed_and_good(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    missing = libvirtspec.load_qemu_conf(str(tmp_path / "nope.conf"))
    assert not missing.present and missing.warnings == ()
    assert missing.default_devices == DEFAULT_DEVICES

    bad = tmp_path / "bad.conf"
    bad.write_text("user = \"root\"\ncgroup_device_acl = [ \"/dev/null\"\n")
    with caplog.at_level(logging.WARNING):
        lc = libvirtspec.load_qemu_conf(str(bad))
        libvirtspec.load_qemu_conf(str(bad))  # cached: warned once
    assert lc.present and len(lc.warnings) == 1
    assert lc.warnings[0].startswith(f"{bad}:2: ") and "defaults" in lc.warnings[0]
    assert lc.uid is None and lc.default_devices == DEFAULT_DEVICES  # defaults used
    assert sum("bad.conf:2" in r.getMessage() for r in caplog.records) == 1

    good = tmp_path / "good.conf"
    good.write_text("user = \"root\"\ngroup = \"+4242\"\n"
                    "cgroup_device_acl = [\"/dev/null\", \"/dev/kvm\"]\n")
    lc = libvirtspec.load_qemu_conf(str(good))
    assert (lc.uid, lc.gid) == (0, 4242) and lc.default_devices == ("/dev/null", "/dev/kvm")


def test_loader_unknown_user_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "q.conf"
    conf.write_text("user = \"no-such-user-nsmount\"\nhugetlbfs_mount = [\"/dev/hp//1G/\"]\n")
    monkeypatch.setenv("NSMOUNT_LIBVIRT_CONFIG", str(conf))
    lc = libvirtspec.load_qemu_conf()
    assert lc.path == str(conf) and lc.uid is None
    assert any("no-such-user-nsmount" in w for w in lc.warnings)
    assert libvirtspec.configured_hugetlbfs() == ("/dev/hp/1G",)


def test_loader_refuses_non_regular(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    lc = libvirtspec.load_qemu_conf(str(fifo))
    assert lc.warnings and "not a regular file" in lc.warnings[0]
