"""libvirt's domain short name and per-domain hugepage paths."""

from __future__ import annotations


def shortname(domain_id: int, name: str) -> str:
    short = name[:20].replace("/", "_")
    return f"{domain_id}-{short}"


def hugepage_base(mount_point: str) -> str:
    return f"{mount_point.rstrip('/')}/libvirt/qemu"


def hugepage_dir(mount_point: str, domain_id: int, name: str) -> str:
    return f"{hugepage_base(mount_point)}/{shortname(domain_id, name)}"
