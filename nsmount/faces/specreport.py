"""``nsmount spec``: what nsmount derives for one VM, and why.

Pure: reads the XML/spec (or the target's record, libvirt status XML or command
line), qemu.conf and sysfs; needs no root and changes nothing.  It answers "what
will nsmount put into this VM?": every node with the element it came from, the
hugepage sizes, the owner of the per-domain directories, VFIO groups (resolved, or
the PCI address when the device is absent here), devices refused and why.

:func:`build_report` returns plain data (the ``--json`` object); :func:`cmd_spec`
prints it.
"""

from __future__ import annotations

import argparse
import os
import stat
from typing import Any

from ..state import sysfs
from ..errors import NoSuchProcessError, NsmountError, SpecError
from ..state.libvirtspec import HostContext, owner, resolve_lookups
from ..model.display import escape_name, safe_line
from ..model.libvirt_xml import Derivation, derive_domain_xml
from ..model.spec import VmSpec
from ..state.files import MAX_XML, read_state_text

MAX_INPUT_BYTES = 16 << 20


def _read_text(path: str) -> str:
    """A regular file (or '-' = stdin), capped, as UTF-8 text; SpecError otherwise."""
    import sys

    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise SpecError(f"{path} is not a regular file")
                data = os.read(fd, MAX_INPUT_BYTES + 1)
                while len(data) <= MAX_INPUT_BYTES:
                    more = os.read(fd, MAX_INPUT_BYTES + 1 - len(data))
                    if not more:
                        break
                    data += more
            finally:
                os.close(fd)
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise SpecError(f"{path} is larger than {MAX_INPUT_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text (byte {exc.start})") from None


# ---------------------------------------------------------------------- report
def report_from_derivation(d: Derivation, ctx: HostContext, *, source: str) -> dict[str, Any]:
    lookups = resolve_lookups(d, ctx)
    conf = ctx.conf
    uid, gid, owner_from = owner(d, conf)
    devices: list[dict[str, Any]] = []
    defaults = conf.default_devices if conf is not None else VmSpec().default_devices
    default_origin = ("cgroup_device_acl (qemu.conf)"
                      if conf is not None and conf.conf.cgroup_device_acl is not None
                      else "libvirt's default node list")
    for p in defaults:
        devices.append({"path": p, "required": False, "origin": default_origin})
    absent: list[dict[str, Any]] = []
    vfio: list[dict[str, Any]] = []
    for it in d.items:
        if it.path is not None:
            devices.append({"path": it.path, "required": it.required, "origin": it.origin})
            continue
        assert it.lookup is not None
        found = lookups.get(it.lookup, [])
        for p in found:
            devices.append({"path": p, "required": it.required, "origin": it.origin,
                            "lookup": it.lookup.describe()})
        if not found:
            absent.append({"origin": it.origin, "lookup": it.lookup.describe(),
                           "required": it.required})
        if it.lookup.kind in ("pci", "mdev"):
            vfio.append({"origin": it.origin, "kind": it.lookup.kind,
                         "address": it.lookup.key[0], "group": found[0] if found else None})
    devices.extend(_dm_targets(devices, ctx))
    return {
        "name": d.name, "id": d.domain_id, "uuid": d.uuid, "source": source,
        "devices": _merge(devices),
        "absent": absent,
        "vfio_groups": vfio,
        "hugepages": list(d.hugepage_sizes),
        "hugepage_sources": [{"size_kib": k, "origin": o} for k, o in d.hugepages],
        "hugetlbfs_mount": (list(conf.conf.hugetlbfs_mount)
                            if conf is not None and conf.conf.hugetlbfs_mount is not None
                            else None),
        "owner": {"uid": uid, "gid": gid, "from": owner_from},
        "refused": list(d.refused),
        "notes": list(d.notes),
        "libvirt_config": _conf_dict(ctx),
    }


def report_from_spec(spec: VmSpec, ctx: HostContext, *, origin: str) -> dict[str, Any]:
    devices = [{"path": p, "required": False, "origin": "default node list (spec)"}
               for p in spec.default_devices]
    devices += [{"path": r.path, "required": r.required, "origin": origin}
                for r in spec.devices]
    devices.extend(_dm_targets(devices, ctx))
    return {
        "name": spec.name, "id": spec.domain_id, "uuid": spec.uuid, "source": spec.source,
        "devices": _merge(devices), "absent": [], "vfio_groups": [],
        "hugepages": list(spec.hugepages),
        "hugepage_sources": [{"size_kib": k, "origin": origin} for k in spec.hugepages],
        "hugetlbfs_mount": None,
        "owner": {"uid": spec.uid, "gid": spec.gid, "from": origin},
        "refused": list(spec.refused), "notes": [], "libvirt_config": _conf_dict(ctx),
    }


def _conf_dict(ctx: HostContext) -> dict[str, Any] | None:
    c = ctx.conf
    if c is None:
        return None
    return {"path": c.path, "present": c.present, "warnings": list(c.warnings)}


def _merge(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per path; a required mention wins over an optional one."""
    out: dict[str, dict[str, Any]] = {}
    for dev in devices:
        old = out.get(dev["path"])
        if old is None:
            out[dev["path"]] = dev
        elif dev["required"] and not old["required"]:
            out[dev["path"]] = {**dev, "origin": dev["origin"]}
    return list(out.values())


def _dm_targets(devices: list[dict[str, Any]], ctx: HostContext) -> list[dict[str, Any]]:
    """Device-mapper targets of the block devices present here (as built)."""
    extra: list[dict[str, Any]] = []
    for dev in list(devices):
        try:
            st = os.stat(os.path.join(ctx.dev, os.path.relpath(dev["path"], "/dev")))
        except (OSError, ValueError):
            continue
        if not stat.S_ISBLK(st.st_mode):
            continue
        for name, major, minor in sysfs.dm_targets(os.major(st.st_rdev), os.minor(st.st_rdev),
                                                   ctx.sysfs):
            extra.append({"path": f"/dev/{name}", "required": False,
                          "origin": f"device-mapper target {major}:{minor} of {dev['path']}"})
    return extra


def build_report(args: argparse.Namespace, ctx: HostContext | None = None) -> dict[str, Any]:
    ctx = ctx or HostContext.load(getattr(args, "libvirt_config", None))
    given = [x for x in (args.domain_xml, args.spec, args.target) if x]
    if len(given) != 1:
        raise NsmountError("nsmount spec needs exactly one of --domain-xml FILE, "
                           "--spec FILE or TARGET")
    if args.domain_xml:
        rep = report_from_derivation(derive_domain_xml(_read_text(args.domain_xml)), ctx,
                                     source="domain-xml")
    elif args.spec:
        spec = VmSpec.from_text(_read_text(args.spec), filename=args.spec)
        rep = report_from_spec(spec, ctx, origin="spec file")
    else:
        rep = _from_target(args.target, ctx, getattr(args, "libvirt_state_dir", None),
                           getattr(args, "state_dir", None))
    return rep


def _from_target(arg: str, ctx: HostContext, lvdir: str | None,
                 sdir: str | None) -> dict[str, Any]:
    """A running VM: nsmount's record, else libvirt's status XML, else its cmdline."""
    from ..state import record
    from ..model.libvirt_xml import derive_status_xml
    from ..state.sources import libvirt_state_dir, looks_like_qemu, resolve_target
    from ..state.target import read_cmdline, starttime

    pid, domain = resolve_target(arg, lvdir=lvdir)
    rec = record.read(pid, sdir)
    if rec is not None and rec.starttime == starttime(pid):
        return report_from_spec(rec.spec, ctx, origin="nsmount launch record")
    if domain is not None:
        path = os.path.join(libvirt_state_dir(lvdir), f"{domain}.xml")
        try:
            text: str | None = read_state_text(path, limit=MAX_XML)
        except FileNotFoundError:
            text = None
        if text is not None:
            try:
                spid, d = derive_status_xml(text)
            except SpecError as exc:
                raise SpecError(f"{path}: {exc}") from None
            if spid != pid:
                raise SpecError(f"{path} names pid {spid}, not {pid}: stale state file")
            return report_from_derivation(d, ctx, source="libvirt-status")
    try:
        raw = read_cmdline(pid)
    except NoSuchProcessError:
        raise SpecError(f"cannot read /proc/{pid}/cmdline: No such file or directory") from None
    except OSError as exc:
        raise SpecError(f"cannot read /proc/{pid}/cmdline: {exc.strerror}") from None
    if not looks_like_qemu(raw):
        raise SpecError(f"pid {pid} is not QEMU and nsmount has no record of it")
    from ..model.qemu_cmdline import spec_from_proc_cmdline

    return report_from_spec(spec_from_proc_cmdline(raw), ctx, origin="QEMU command line")


# ---------------------------------------------------------------------- print
def format_text(rep: dict[str, Any]) -> list[str]:
    name = escape_name(rep["name"]) if rep["name"] is not None else "(unnamed)"
    ident = f", id {rep['id']}" if rep["id"] is not None else ""
    lines = [f"domain {name}{ident} (from {rep['source']})", "devices:"]
    for dev in rep["devices"]:
        why = dev["origin"] + (f" ({dev['lookup']})" if dev.get("lookup") else "")
        lines.append(f"  {escape_name(dev['path']):<28} "
                     f"{'required' if dev['required'] else 'optional':<8}  {why}")
    for a in rep["absent"]:
        lines.append(f"  {'-':<28} {'required' if a['required'] else 'optional':<8}  "
                     f"{a['origin']}: {a['lookup']} is not present on this host")
    if rep["vfio_groups"]:
        lines.append("VFIO groups:")
        for v in rep["vfio_groups"]:
            lines.append(f"  {v['kind']} {escape_name(v['address'])} -> "
                         f"{escape_name(v['group']) if v['group'] else 'absent here'}")
    sizes = ", ".join("default size" if k == 0 else f"{k} KiB" for k in rep["hugepages"])
    lines.append(f"hugepages: {sizes or 'none'}")
    for hs in rep["hugepage_sources"]:
        size = "default size" if hs["size_kib"] == 0 else f"{hs['size_kib']} KiB"
        lines.append(f"  {size} from {hs['origin']}")
    if rep["hugetlbfs_mount"] is not None:
        lines.append("hugetlbfs mounts (qemu.conf): "
                     + (", ".join(escape_name(p) for p in rep["hugetlbfs_mount"]) or "none"))
    o = rep["owner"]
    lines.append(f"per-domain directory owner: {o['uid']}:{o['gid']} ({o['from']})")
    for r in rep["refused"]:
        lines.append(f"refused: {r}")
    for n in rep["notes"]:
        lines.append(f"note: {n}")
    conf = rep["libvirt_config"]
    if conf is not None:
        state = "read" if conf["present"] else "absent: libvirt's defaults"
        lines.append(f"libvirt config: {escape_name(conf['path'])} ({state})")
        for w in conf["warnings"]:
            lines.append(f"warning: {w}")
    return [safe_line(line) for line in lines]
