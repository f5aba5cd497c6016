"""VmSpec: what one VM's mount namespace should hold.

Every source (nsmount's launch record, a libvirt domain or status XML, a QEMU
command line, a TOML/JSON launcher spec) produces the same value, so the planner
never cares where the wish came from; ``source`` says it for the report.
"""

from __future__ import annotations

import functools
import json
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import SpecError
from .paths import canonical

#: libvirt's default cgroup_device_acl list (qemu.conf), the nodes every VM gets.
DEFAULT_DEVICES: tuple[str, ...] = (
    "/dev/null",
    "/dev/full",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
    "/dev/ptmx",
    "/dev/kvm",
)


@dataclass(frozen=True)
class DeviceRequest:
    """One path the VM needs.  ``required`` ones fail the launch when missing."""

    path: str
    required: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", canonical(self.path, what="device path"))


@dataclass(frozen=True)
class VmSpec:
    name: str | None = None
    #: runtime domain id (libvirt's ``<domain id=N>``); part of the hugepage dir name
    domain_id: int | None = None
    uuid: str | None = None
    devices: tuple[DeviceRequest, ...] = ()
    #: nodes every VM gets; optional (a host without /dev/kvm is fine)
    default_devices: tuple[str, ...] = DEFAULT_DEVICES
    #: hugepage sizes in KiB the VM's memory uses; () = no hugepages wanted.
    #: 0 in the tuple means "the default size".
    hugepages: tuple[int, ...] = ()
    #: explicit memory-backend paths (``-mem-path``), informative
    memory_paths: tuple[str, ...] = ()
    #: extra host mount points the VM must see ("mounts VMs must see")
    mounts: tuple[str, ...] = ()
    #: owner of the per-domain hugepage directory
    uid: int = 0
    gid: int = 0
    #: where the spec came from: record, libvirt-status, domain-xml, cmdline, spec
    source: str = "spec"
    #: devices the source named but nsmount refused (one line each: a path reaching
    #: /dev through '..', an unusable address); reported, never fatal for the VM
    refused: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Validate and normalise what a library caller passed: plain strings for
        devices (as TOML allows), lists for tuples, ``hugepages=True`` for the default
        size.  Bad input is a SpecError here, never an AttributeError later."""
        if _well_formed(self):
            return  # what every parser builds: nothing to normalise

        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not (isinstance(self.devices, tuple)
                and all(isinstance(d, DeviceRequest) for d in self.devices)):
            if isinstance(self.devices, (str, bytes)) or not _iterable(self.devices):
                raise SpecError("VmSpec devices must be a list of paths or DeviceRequests")
            put("devices", tuple(d if isinstance(d, DeviceRequest) else _device_from(d)
                                 for d in self.devices))
        for name in ("default_devices", "memory_paths", "mounts", "refused"):
            val = getattr(self, name)
            if not isinstance(val, tuple) or not all(isinstance(x, str) for x in val):
                if isinstance(val, (str, bytes)) or not _iterable(val):
                    raise SpecError(f"VmSpec {name} must be a list of strings")
                put(name, tuple(_str(x, name) for x in val))
        hp = self.hugepages
        if hp is True:
            put("hugepages", (0,))
        elif hp is False or hp is None:
            put("hugepages", ())
        elif isinstance(hp, int):
            put("hugepages", (hp,))
        elif not isinstance(hp, tuple):
            put("hugepages", tuple(hp) if _iterable(hp) else ())
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                   for x in self.hugepages):
            raise SpecError("VmSpec hugepages must be sizes in KiB (0 = the default size)")
        for name in ("uid", "gid"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SpecError(f"VmSpec {name} must be a non-negative integer")
        if self.domain_id is not None and (not isinstance(self.domain_id, int)
                                           or isinstance(self.domain_id, bool)
                                           or self.domain_id < 0):
            raise SpecError("VmSpec domain_id must be a non-negative integer")
        if self.name is not None and not isinstance(self.name, str):
            raise SpecError("VmSpec name must be a string")

    # ---------------------------------------------------------------- helpers
    @property
    def wants_hugepages(self) -> bool:
        return bool(self.hugepages)

    def all_device_requests(self) -> tuple[DeviceRequest, ...]:
        """Defaults (optional) then the VM's own, de-duplicated by path."""
        seen: dict[str, DeviceRequest] = dict(_default_requests(self.default_devices))
        for req in self.devices:
            old = seen.get(req.path)
            if old is None or (req.required and not old.required):
                seen[req.path] = req
        return tuple(seen.values())

    def with_devices(self, paths: Iterable[str], required: bool = True) -> VmSpec:
        have = {d.path for d in self.devices}
        extra = tuple(DeviceRequest(p, required) for p in paths if canonical(p) not in have)
        return replace(self, devices=self.devices + extra)

    def without_devices(self, paths: Iterable[str]) -> VmSpec:
        drop = {canonical(p) for p in paths}
        return replace(self, devices=tuple(d for d in self.devices if d.path not in drop))

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = [{"path": r.path, "required": r.required} for r in self.devices]
        for k in ("default_devices", "hugepages", "memory_paths", "mounts", "refused"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> VmSpec:
        """Build from a dict (TOML/JSON launcher spec or a launch record).

        Accepted keys: name, id/domain_id, uuid, devices (strings or
        ``{path, required|optional}`` tables), default_devices, hugepages (bool,
        a size in KiB, or a list of sizes), memory_paths, mounts, uid, gid,
        source.  Unknown keys are an error: a typo must not silently drop a device.
        """
        if not isinstance(data, dict):
            raise SpecError("spec must be a table/object at the top level")
        known = {
            "name", "id", "domain_id", "uuid", "devices", "default_devices", "hugepages",
            "memory_paths", "mounts", "uid", "gid", "source", "refused",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown spec key(s): {', '.join(unknown)}")
        try:
            name = data.get("name")
            if name is not None and not isinstance(name, str):
                raise SpecError("spec 'name' must be a string")
            dom_id = data.get("domain_id", data.get("id"))
            if dom_id is not None and (not isinstance(dom_id, int) or isinstance(dom_id, bool)
                                       or dom_id < 0):
                raise SpecError("spec 'id' must be a non-negative integer")
            devices = tuple(_device_from(x) for x in _list(data, "devices"))
            defaults = tuple(canonical(_str(x, "default_devices"))
                             for x in _list(data, "default_devices", DEFAULT_DEVICES))
            hp = data.get("hugepages", ())
            if hp is True:
                hugepages: tuple[int, ...] = (0,)
            elif hp is False or hp is None or hp == () or hp == []:
                hugepages = ()
            elif isinstance(hp, int):
                hugepages = (hp,)
            elif isinstance(hp, (list, tuple)) and all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in hp):
                hugepages = tuple(hp)
            else:
                raise SpecError("spec 'hugepages' must be true/false, a size in KiB or a list")
            mounts = tuple(canonical(_str(x, "mounts"), what="mount")
                           for x in _list(data, "mounts"))
            mem = tuple(canonical(_str(x, "memory_paths"), what="memory path")
                        for x in _list(data, "memory_paths"))
            uid, gid = data.get("uid", 0), data.get("gid", 0)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in (uid, gid)):
                raise SpecError("spec 'uid'/'gid' must be non-negative integers")
            uuid = data.get("uuid")
            if uuid is not None and not isinstance(uuid, str):
                raise SpecError("spec 'uuid' must be a string")
            src = source or data.get("source") or "spec"
            refused = tuple(_str(x, "refused") for x in _list(data, "refused"))
        except (TypeError, ValueError) as exc:  # defensive: never leak raw errors
            raise SpecError(f"invalid spec: {exc}") from None
        return cls(name=name, domain_id=dom_id, uuid=uuid, devices=devices,
                   default_devices=defaults, hugepages=hugepages, memory_paths=mem,
                   mounts=mounts, uid=uid, gid=gid, source=str(src), refused=refused)

    @classmethod
    def from_text(cls, text: str, *, filename: str = "<spec>") -> VmSpec:
        """Parse a TOML or JSON launcher spec (JSON when it starts with '{')."""
        stripped = text.lstrip()
        try:
            if stripped.startswith("{"):
                data = json.loads(text)
            else:
                data = tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SpecError(f"{filename}: malformed spec: {exc}") from None
        try:
            return cls.from_dict(data)
        except SpecError as exc:  # keep the kind (UnsafePathError: exit 4, not 3)
            raise type(exc)(f"{filename}: {exc}") from None


def _list(data: dict[str, Any], key: str, default: Iterable[Any] = ()) -> list[Any]:
    val = data.get(key, list(default))
    if not isinstance(val, (list, tuple)):
        raise SpecError(f"spec {key!r} must be a list")
    return list(val)


def _str(x: Any, key: str) -> str:
    if not isinstance(x, str):
        raise SpecError(f"spec {key!r} entries must be strings")
    return x


def _device_from(x: Any) -> DeviceRequest:
    if isinstance(x, str):
        return DeviceRequest(x)
    if isinstance(x, dict) and isinstance(x.get("path"), str):
        extra = set(x) - {"path", "required", "optional"}
        if extra:
            raise SpecError(f"unknown device key(s): {', '.join(sorted(extra))}")
        required = bool(x.get("required", not x.get("optional", False)))
        return DeviceRequest(x["path"], required)
    raise SpecError("each device must be a path string or a {path=..., optional=...} table")


def _iterable(x: object) -> bool:
    try:
        iter(x)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _default_requests(paths: tuple[str, ...]) -> tuple[tuple[str, DeviceRequest], ...]:
    """The default nodes as optional requests (the same few lists for every VM)."""
    out: dict[str, DeviceRequest] = {}
    for p in paths:
        out.setdefault(canonical(p), DeviceRequest(p, required=False))
    return tuple(out.items())


def _well_formed(spec: VmSpec) -> bool:
    """The cheap check for a spec that needs no normalisation (the common case)."""
    for name in ("default_devices", "memory_paths", "mounts", "refused"):
        val = getattr(spec, name)
        if type(val) is not tuple:
            return False
        for x in val:
            if type(x) is not str:
                return False
    if type(spec.devices) is not tuple or type(spec.hugepages) is not tuple:
        return False
    for d in spec.devices:
        if type(d) is not DeviceRequest:
            return False
    for h in spec.hugepages:
        if type(h) is not int or h < 0:
            return False
    return (type(spec.uid) is int and spec.uid >= 0 and type(spec.gid) is int and spec.gid >= 0
            and (spec.domain_id is None or (type(spec.domain_id) is int and spec.domain_id >= 0))
            and (spec.name is None or type(spec.name) is str))
