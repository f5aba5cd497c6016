"""A libvirt domain's VmSpec as libvirt on *this* host would see it.

:mod:`nsmount.model.libvirt_xml` reads the XML (pure); this module adds what only
the host knows, at the time nsmount builds or repairs: ``qemu.conf``
(``cgroup_device_acl``, ``hugetlbfs_mount``, ``user``/``group``) and the sysfs
lookups (VFIO groups, ``sgN``, USB devices by id, the render node libvirt picks).

``qemu.conf`` is ``--libvirt-config``, else ``$NSMOUNT_LIBVIRT_CONFIG``, else
``/etc/libvirt/qemu.conf``; a missing file means libvirt's defaults, a malformed
one is warned about once (file and line) and the defaults are used.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass, field

from ..model.libvirt_xml import Derivation, HostLookup, derive_domain_xml, derive_status_xml
from ..model.qemu_conf import MAX_CONF_BYTES, QemuConf, QemuConfError, parse_qemu_conf
from ..model.spec import DEFAULT_DEVICES, VmSpec
from ..model.paths import dev_path_of
from . import sysfs as sysfs_mod

log = logging.getLogger(__name__)

DEFAULT_LIBVIRT_CONFIG = "/etc/libvirt/qemu.conf"
ENV_LIBVIRT_CONFIG = "NSMOUNT_LIBVIRT_CONFIG"


def libvirt_config_path(override: str | None = None) -> str:
    return override or os.environ.get(ENV_LIBVIRT_CONFIG) or DEFAULT_LIBVIRT_CONFIG


@dataclass(frozen=True)
class LoadedConf:
    """qemu.conf as loaded: the settings, and what the host made of them."""

    path: str
    conf: QemuConf = field(default_factory=QemuConf)
    present: bool = False
    warnings: tuple[str, ...] = ()
    #: user/group resolved to ids (None: not configured or unknown here)
    uid: int | None = None
    gid: int | None = None

    @property
    def default_devices(self) -> tuple[str, ...]:
        """The default node list: ``cgroup_device_acl`` (its /dev paths) or libvirt's."""
        acl = self.conf.cgroup_device_acl
        if acl is None:
            return DEFAULT_DEVICES
        out: list[str] = []
        for p in acl:
            node, _ = dev_path_of(p)
            if node is not None and node not in out:
                out.append(node)
        return tuple(out)


_CACHE: dict[tuple[str, int, int, int], LoadedConf] = {}


def load_qemu_conf(path: str | None = None) -> LoadedConf:
    """Load (and cache per file version) qemu.conf; never raises."""
    p = libvirt_config_path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return LoadedConf(p)
    except OSError as exc:
        return _warned(LoadedConf(p, warnings=(f"{p}: cannot read: {exc.strerror}; "
                                               "using libvirt's defaults",)))
    try:
        st = os.fstat(fd)
        key = (p, st.st_ino, st.st_mtime_ns, st.st_size)
        if key in _CACHE:
            return _CACHE[key]
        if not stat.S_ISREG(st.st_mode):
            lc = LoadedConf(p, warnings=(f"{p}: not a regular file; using libvirt's defaults",))
        else:
            lc = _from_text(p, os.read(fd, MAX_CONF_BYTES + 1))
    except OSError as exc:
        return _warned(LoadedConf(p, warnings=(f"{p}: cannot read: {exc.strerror}; "
                                               "using libvirt's defaults",)))
    finally:
        os.close(fd)
    _CACHE[key] = _warned(lc)
    return _CACHE[key]


def _warned(lc: LoadedConf) -> LoadedConf:
    for w in lc.warnings:
        log.warning("%s", w)
    return lc


def _from_text(p: str, raw: bytes) -> LoadedConf:
    try:
        conf = parse_qemu_conf(raw.decode("utf-8"), p)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        return LoadedConf(p, present=True, warnings=(
            f"{p}:{line}: not UTF-8 text; using libvirt's defaults",))
    except QemuConfError as exc:
        return LoadedConf(p, present=True, warnings=(
            f"{exc.oneline()}; using libvirt's defaults",))
    warnings: list[str] = []
    uid = gid = None
    if conf.user is not None:
        uid = resolve_user(conf.user)
        if uid is None:
            warnings.append(f"{p}: user {conf.user[:40]!r} does not exist here")
    if conf.group is not None:
        gid = resolve_group(conf.group)
        if gid is None:
            warnings.append(f"{p}: group {conf.group[:40]!r} does not exist here")
    elif uid is not None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = None
    return LoadedConf(p, conf, True, tuple(warnings), uid, gid)


def _numeric(name: str) -> int | None:
    text = name[1:] if name.startswith("+") else name
    if text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < 1 << 32:
        return int(text)
    return None


def resolve_user(name: str) -> int | None:
    """libvirt's rule: ``+N`` is numeric; else a name, else a plain number."""
    if not name.startswith("+"):
        try:
            return pwd.getpwnam(name).pw_uid
        except (KeyError, ValueError, UnicodeError):
            pass
    return _numeric(name)


def resolve_group(name: str) -> int | None:
    if not name.startswith("+"):
        try:
            return grp.getgrnam(name).gr_gid
        except (KeyError, ValueError, UnicodeError):
            pass
    return _numeric(name)


def configured_hugetlbfs(path: str | None = None) -> tuple[str, ...] | None:
    """qemu.conf's ``hugetlbfs_mount`` (canonical paths), or None when not set."""
    conf = load_qemu_conf(path).conf.hugetlbfs_mount
    if conf is None:
        return None
    out: list[str] = []
    for p in conf:
        if p.startswith("/") and "\0" not in p and ".." not in p.split("/"):
            out.append("/" + "/".join(c for c in p.split("/") if c not in ("", ".")))
    return tuple(out)


# ---------------------------------------------------------------------- lookups
@dataclass(frozen=True)
class HostContext:
    sysfs: str = "/sys"
    dev: str = "/dev"
    conf: LoadedConf | None = None

    @classmethod
    def load(cls, config: str | None = None, *, sysfs: str = "/sys",
             dev: str = "/dev") -> HostContext:
        return cls(sysfs, dev, load_qemu_conf(config))


def resolve_lookup(lk: HostLookup, ctx: HostContext) -> list[str]:
    """The /dev path(s) a host lookup names here; [] when the host has no such thing."""
    if lk.kind == "pci":
        g = sysfs_mod.pci_vfio_group(lk.key[0], ctx.sysfs)
        return [g] if g else []
    if lk.kind == "mdev":
        g = sysfs_mod.mdev_vfio_group(lk.key[0], ctx.sysfs)
        return [g] if g else []
    if lk.kind == "scsi":
        h, b, t, u = (int(x) for x in lk.key)
        sg = sysfs_mod.scsi_sg(h, b, t, u, ctx.sysfs)
        return [sg] if sg else []
    if lk.kind == "usb":
        return sysfs_mod.usb_by_id(lk.key[0], lk.key[1], ctx.sysfs)
    if lk.kind == "rendernode":
        node = sysfs_mod.render_node(ctx.dev)
        return [node] if node else []
    return []


def resolve_lookups(d: Derivation, ctx: HostContext) -> dict[HostLookup, list[str]]:
    return {it.lookup: resolve_lookup(it.lookup, ctx) for it in d.items
            if it.lookup is not None}


def owner(d: Derivation, conf: LoadedConf | None) -> tuple[int, int, str]:
    """(uid, gid, where from): the domain's DAC seclabel, else qemu.conf's
    user/group, else root (libvirt's owner of the per-domain directories)."""
    if d.owner is not None:
        return d.owner[0], d.owner[1], "seclabel"
    if d.owner_label is not None:
        u, _, g = d.owner_label.partition(":")
        uid, gid = resolve_user(u), resolve_group(g)
        if uid is not None and gid is not None:
            return uid, gid, "seclabel"
    if conf is not None and conf.uid is not None:
        return conf.uid, conf.gid if conf.gid is not None else 0, "qemu.conf"
    return 0, 0, "default"


def spec_from_derivation(d: Derivation, *, source: str, ctx: HostContext | None = None
                         ) -> VmSpec:
    ctx = ctx or HostContext.load()
    uid, gid, _ = owner(d, ctx.conf)
    defaults = ctx.conf.default_devices if ctx.conf is not None else DEFAULT_DEVICES
    lookups = resolve_lookups(d, ctx)
    for it in d.items:
        if it.lookup is not None and not lookups.get(it.lookup):
            log.warning("%s: %s is not present on this host; its node is left out",
                        it.origin, it.lookup.describe())
    for why in d.refused:
        log.warning("refused: %s", why)
    return d.to_spec(source=source, resolved=lookups, uid=uid, gid=gid,
                     default_devices=defaults)


def spec_from_domain_xml(text: str, *, source: str = "domain-xml",
                         ctx: HostContext | None = None) -> VmSpec:
    """A domain (or status) XML's VmSpec with qemu.conf and sysfs applied."""
    return spec_from_derivation(derive_domain_xml(text), source=source, ctx=ctx)


def spec_from_status_xml(text: str, *, ctx: HostContext | None = None) -> tuple[int, VmSpec]:
    pid, d = derive_status_xml(text)
    return pid, spec_from_derivation(d, source="libvirt-status", ctx=ctx)
