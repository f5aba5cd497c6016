"""Actions: small values the planner emits and the executor applies.

They print well (``describe``), serialise to JSON (``to_dict``) and their class
names are the fault-injection points of the crash tests (``STEPS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..model.devnode import Entry
from ..model.display import escape_name as _e


@dataclass(frozen=True)
class Action:
    #: why this action exists (the drift it fixes), shown to the admin
    reason: str = field(default="", kw_only=True, compare=False)

    @property
    def name(self) -> str:
        """The class name (the fault-injection point of the crash tests)."""
        return type(self).__name__

    @property
    def kind(self) -> str:
        """The stable, documented name in JSON and logs: ``make-hugepage-dir``."""
        return _kind_of(type(self))

    def describe(self) -> str:  # pragma: no cover - overridden
        return self.name

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"action": self.kind, "description": self.describe()}
        for name in _field_names(type(self)):
            val = getattr(self, name)
            if isinstance(val, Entry):
                val = val.to_dict()
            elif isinstance(val, tuple):
                val = [v.to_dict() if isinstance(v, Action) else v for v in val]
            d[name] = val
        return d


#: per action class, worked out once: its kind, its field names
_KINDS: dict[type, str] = {}
_FIELDS: dict[type, tuple[str, ...]] = {}


def _kind_of(cls: type) -> str:
    kind = _KINDS.get(cls)
    if kind is None:
        kind = _KINDS[cls] = kebab(cls.__name__)
    return kind


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls))
    return names


@dataclass(frozen=True)
class CreateDevTmpfs(Action):
    """A detached tmpfs for the new /dev, populated through its fd before it is
    attached (nodes are never made at a visible path)."""
    size: int = 65536
    mode: int = 0o755

    def describe(self) -> str:
        return f"create detached tmpfs for /dev (mode={self.mode:o},size={self.size},nosuid)"


@dataclass(frozen=True)
class MakeDir(Action):
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0

    def describe(self) -> str:
        return f"mkdir {_e(self.path)} ({self.mode:04o} {self.uid}:{self.gid})"


@dataclass(frozen=True)
class MakeNode(Action):
    entry: Entry
    replace: bool = False

    def describe(self) -> str:
        verb = "replace" if self.replace else "mknod"
        return f"{verb} {_e(self.entry.path)} {self.entry.describe()}"


@dataclass(frozen=True)
class FixNode(Action):
    """Owner/mode/xattrs of an existing, correct node."""
    entry: Entry

    def describe(self) -> str:
        e = self.entry
        return f"chown/chmod {_e(e.path)} to {e.mode:04o} {e.uid}:{e.gid}"


@dataclass(frozen=True)
class MakeSymlink(Action):
    path: str
    target: str
    replace: bool = False

    def describe(self) -> str:
        return f"symlink {_e(self.path)} -> {_e(self.target)}"


@dataclass(frozen=True)
class RemoveEntry(Action):
    path: str

    def describe(self) -> str:
        return f"remove {_e(self.path)}"


@dataclass(frozen=True)
class PreserveMount(Action):
    """Clone a /dev submount (with its submounts) before the old /dev goes away."""
    path: str

    def describe(self) -> str:
        return f"preserve submount {_e(self.path)}"


@dataclass(frozen=True)
class SwitchDev(Action):
    """Detach the old /dev, attach the new tmpfs, put preserved submounts back."""
    preserved: tuple[str, ...] = ()

    def describe(self) -> str:
        extra = f", keep {' '.join(map(_e, self.preserved))}" if self.preserved else ""
        return f"switch /dev to the new tmpfs{extra}"


@dataclass(frozen=True)
class ReplayMount(Action):
    """Bring a host mount into the namespace: open_tree clone on the host, made
    slave, attached inside with move_mount onto a verified mount point."""
    path: str
    fstype: str
    pagesize: int | None = None  # bytes, hugetlbfs only
    make_mountpoint: bool = True

    def describe(self) -> str:
        ps = f" pagesize={_size(self.pagesize)}" if self.pagesize else ""
        return f"mount host {_e(self.fstype)} at {_e(self.path)}{ps} (clone, slave)"


@dataclass(frozen=True)
class RelinkMount(Action):
    """A mount that became private: join the host's peer group (MOVE_MOUNT_SET_GROUP),
    then make it a slave."""
    path: str

    def describe(self) -> str:
        return f"re-link {_e(self.path)} as slave of the host mount"


@dataclass(frozen=True)
class MakeHugepageDir(Action):
    """``<mount>/libvirt/qemu/<id>-<name>``, 0700 for the QEMU user."""
    mount: str
    path: str
    uid: int = 0
    gid: int = 0
    host: bool = False  # made from the host side instead of inside the namespace

    def describe(self) -> str:
        side = "host" if self.host else "vm"
        return f"mkdir -p {_e(self.path)} (0700 {self.uid}:{self.gid}, {side} side)"


@dataclass(frozen=True)
class SwapDev(Action):
    """Rebuild /dev of a running VM: fresh detached tmpfs, populated via its fd,
    submounts carried over, swapped in with MOVE_MOUNT_BENEATH + detach of the old."""
    populate: tuple[Action, ...] = ()
    preserved: tuple[str, ...] = ()

    def describe(self) -> str:
        return (f"rebuild /dev ({len(self.populate)} entries, keep "
                f"{' '.join(map(_e, self.preserved)) or 'no submounts'}) and swap it in "
                "atomically")


# ------------------------------------------------- rootless launch (user namespace)
@dataclass(frozen=True)
class StackDev(Action):
    """Rootless: attach the new /dev tmpfs on top of the old one, then put preserved
    submounts back.  A user namespace cannot unmount the host's /dev (it is locked to
    the mounts it came with), so it stays hidden beneath."""
    preserved: tuple[str, ...] = ()

    def describe(self) -> str:
        extra = f", keep {' '.join(map(_e, self.preserved))}" if self.preserved else ""
        return f"stack the new tmpfs on /dev{extra}"


@dataclass(frozen=True)
class MountDevpts(Action):
    """Rootless: a new devpts instance (``newinstance,ptmxmode=0666,mode=620``)."""
    path: str = "/dev/pts"

    def describe(self) -> str:
        return f"mount a new devpts instance at {_e(self.path)} (ptmxmode=0666)"


@dataclass(frozen=True)
class BindNode(Action):
    """Rootless: mknod is refused in a user namespace, so an empty file is made on the
    VM's /dev tmpfs and a clone of the host's node (taken with open_tree before /dev
    was covered) is attached onto it with move_mount."""
    entry: Entry

    def describe(self) -> str:
        e = self.entry
        return f"bind host node {_e(e.path)} ({e.kind} {e.major}:{e.minor}) onto an empty file"


@dataclass(frozen=True)
class SealNamespace(Action):
    """Rootless: enter one more user + mount namespace (same ids), so every mount built
    so far is locked: the VM cannot unmount its /dev to reveal the host's."""
    uid: int = 0
    gid: int = 0

    def describe(self) -> str:
        return f"seal: nested user namespace ({self.uid}:{self.gid}), mounts locked"


def kebab(name: str) -> str:
    """``MakeHugepageDir`` -> ``make-hugepage-dir``."""
    return "".join(("-" + ch.lower()) if ch.isupper() and i else ch.lower()
                   for i, ch in enumerate(name))


def _size(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


#: every apply step, for the crash-injection tests
STEPS: tuple[type[Action], ...] = (
    CreateDevTmpfs, MakeDir, MakeNode, FixNode, MakeSymlink, RemoveEntry, PreserveMount,
    SwitchDev, ReplayMount, RelinkMount, MakeHugepageDir, SwapDev,
    StackDev, MountDevpts, BindNode, SealNamespace,
)
