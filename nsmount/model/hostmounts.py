"""Host mounts VMs depend on: /dev submounts and hugetlbfs mounts (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

from .mountinfo import Mount, MountTree
from .paths import components, is_strictly_within

_SIZE = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int | None:
    """'2M' -> 2097152 (hugetlbfs ``pagesize=`` style); None when unparsable."""
    text = text.strip()
    if not text:
        return None
    mult = _SIZE.get(text[-1].upper(), 1)
    num = text[:-1] if text[-1].upper() in _SIZE else text
    return int(num) * mult if num.isdigit() else None


@dataclass(frozen=True)
class HostMount:
    """A host mount point a VM should see, as seen from the host."""

    path: str
    fstype: str
    dev: tuple[int, int]
    root: str = "/"
    propagation: str = "private"
    pagesize: int | None = None  # bytes, hugetlbfs only

    @classmethod
    def from_mount(cls, m: Mount, default_pagesize: int | None = None) -> HostMount:
        ps = None
        if m.fstype == "hugetlbfs":
            opt = m.option("pagesize")
            ps = parse_size(opt) if opt else default_pagesize
        return cls(m.mountpoint, m.fstype, m.dev, m.root, m.propagation, ps)

    @property
    def under_dev(self) -> bool:
        return is_strictly_within(self.path, "/dev")

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "fstype": self.fstype, "dev": f"{self.dev[0]}:{self.dev[1]}",
                "propagation": self.propagation, "pagesize": self.pagesize}


def visible_top(tree: MountTree, path: str) -> Mount | None:
    """The mount a lookup of ``path`` lands on (top of the stack), if visible."""
    vis = {m.mount_id for m in tree.visible()}
    for m in reversed(tree.at(path)):
        if m.mount_id in vis:
            return m
    return None


def dev_submounts(tree: MountTree) -> list[Mount]:
    """Top-level mounts below the visible /dev (nested ones travel with their parent),
    one per mount point (the top of a stack), in mount order."""
    dev = visible_top(tree, "/dev")
    if dev is None:
        return []
    out: dict[str, Mount] = {}
    for m in tree.visible():  # only the top of a stack is visible
        if not is_strictly_within(m.mountpoint, "/dev"):
            continue
        bottom = m  # a child of /dev itself, or stacked on such a child at the same path
        while (parent := tree.by_id.get(bottom.parent_id)) is not None and \
                parent.mountpoint == bottom.mountpoint and parent is not bottom:
            bottom = parent
        if bottom.parent_id == dev.mount_id:
            out[m.mountpoint] = m
    return list(out.values())


def hugetlbfs_mounts(tree: MountTree, default_pagesize: int | None = None) -> list[HostMount]:
    seen: dict[str, HostMount] = {}
    for m in tree.visible():
        if m.fstype == "hugetlbfs":
            seen[m.mountpoint] = HostMount.from_mount(m, default_pagesize)
    return sorted(seen.values(), key=lambda h: components(h.path))

