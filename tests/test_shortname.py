"""libvirt short names and per-domain hugepage paths."""

from __future__ import annotations

import pytest

from nsmount.errors import SpecError, UnsafePathError
from nsmount.model.shortname import hugepage_base, hugepage_dir, shortname


def test_short_name_matches_libvirt() -> None:
    assert shortname(5, "vm1") == "5-vm1"
    assert shortname(12, "a-very-long-domain-name-indeed") == "12-a-very-long-domain-n"
    assert shortname(0, "") == "0-"


def test_cut_counts_characters_not_bytes() -> None:
    name = "ä" * 25  # 2 UTF-8 bytes each: a byte cut would split a character
    assert shortname(1, name) == "1-" + "ä" * 20
    jp = "日本語のドメイン名はとても長いですからね"  # 20 characters, 60 bytes
    assert shortname(1, jp + "よ") == "1-" + jp


def test_slash_and_nul_replaced_result_is_one_component() -> None:
    s = shortname(3, "../../etc/x\0y")
    assert "/" not in s and "\0" not in s and s not in (".", "..")
    assert s == "3-.._.._etc_x_y"


@pytest.mark.parametrize("bad", [-1, True, "3", None])
def test_bad_id(bad: object) -> None:
    with pytest.raises(SpecError):
        shortname(bad, "x")  # type: ignore[arg-type]


def test_hugepage_paths() -> None:
    assert hugepage_base("/dev/hugepages") == "/dev/hugepages/libvirt/qemu"
    assert hugepage_base("/dev/hugepages/") == "/dev/hugepages/libvirt/qemu"
    assert hugepage_base("/") == "/libvirt/qemu"
    assert hugepage_dir("/dev/hugepages1G", 7, "db") == "/dev/hugepages1G/libvirt/qemu/7-db"


@pytest.mark.parametrize("bad", ["dev/hugepages", "/dev/../mnt", ""])
def test_hugepage_base_refuses_unsafe_mount_point(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        hugepage_base(bad)
