"""libvirt's domain "short name" and the per-domain hugepage directory built from it.

libvirt names per-VM state (``/run/libvirt/qemu/<shortname>.dev``, the hugepage
directory ``<hugetlbfs>/libvirt/qemu/<shortname>``) with ``"<id>-<name[:20]>"``.
We must produce the very same string, or QEMU (which libvirt tells to use that
path) and nsmount would disagree about which directory the VM's memory lives in.
"""

from __future__ import annotations

from ..errors import SpecError
from .paths import canonical

#: libvirt cuts the name to this many characters (wide characters, not bytes).
NAME_MAX_CHARS = 20


def shortname(domain_id: int, name: str) -> str:
    """Return ``"<domain_id>-<name cut to 20 characters>"`` as libvirt does.

    The cut counts characters, not UTF-8 bytes (libvirt converts to wide chars
    first), so a multibyte name is never split in the middle of a character.

    libvirt refuses names containing '/', so it escapes nothing; we still replace
    '/' (and NUL) with '_' defensively, because the result becomes one path
    component and a name from a hand-written spec must not add a directory level.
    The result can never be '.' or '..': it always starts with the decimal id and
    a '-'.
    """
    if isinstance(domain_id, bool) or not isinstance(domain_id, int) or domain_id < 0:
        raise SpecError(f"domain id must be a non-negative integer, not {domain_id!r}")
    if not isinstance(name, str):
        raise SpecError(f"domain name must be a string, not {type(name).__name__}")
    cut = name[:NAME_MAX_CHARS].replace("/", "_").replace("\0", "_")
    return f"{domain_id}-{cut}"


def hugepage_base(mount_point: str) -> str:
    """``<mount_point>/libvirt/qemu``: the directory libvirt creates (mode 0777) per mount.

    ``mount_point`` is canonicalised first (UnsafePathError for relative paths or
    '..'), so ``/dev/hugepages/`` and ``/dev/hugepages`` give the same answer.
    """
    base = canonical(mount_point, what="hugetlbfs mount point").rstrip("/")
    return f"{base}/libvirt/qemu"


def hugepage_dir(mount_point: str, domain_id: int, name: str) -> str:
    """``<mount_point>/libvirt/qemu/<shortname>``: the per-domain hugepage directory."""
    return f"{hugepage_base(mount_point)}/{shortname(domain_id, name)}"
