"""What a libvirt domain needs in its private /dev, from its domain or status XML.

libvirt's QEMU driver decides which nodes a VM's /dev gets from the domain
definition (``src/qemu/qemu_namespace.c``): the default node list, every disk with
its backing chain (and block-job mirror), hostdevs (``qemuDomainGetHostdevPath``:
VFIO groups, USB and SCSI nodes, vhost-scsi), memory devices, chardevs, TPM,
render nodes, ``/dev/udmabuf``, inputs, RNG, loader/NVRAM and SEV.  We follow the
same rules element by element so nsmount can build or repair that /dev without
asking libvirtd.

This module is pure.  Some nodes are named by the host, not by the XML (a PCI
device's IOMMU group, a SCSI address's ``sgN``, a USB device found by vendor and
product, the render node libvirt picks for ``<gl enable='yes'/>``): those come out
as :class:`HostLookup` items that :mod:`nsmount.state.libvirtspec` resolves through sysfs.

Paths: only paths under /dev become device requests.  libvirt accepts relative
paths and '..' in image paths, so those are quietly not ours; a path that reaches
/dev *through* '..' is refused for that one device (listed in ``refused``), never
for the whole domain.

Security: the XML may come from a file an admin points us at or a hook's stdin, so
it is untrusted text.  It is parsed with defusedxml: no DTDs, no entity expansion,
no external references.  Every problem surfaces as :class:`SpecError` with a
one-line message.
"""

from __future__ import annotations

import mmap
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import cast


from ..errors import NsmountError, SpecError
from .paths import dev_path_of
from .spec import DeviceRequest, VmSpec

_QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
_UINT = re.compile(r"[0-9]{1,20}")  # bounded: int() refuses >4300 digits
#: unit suffix -> bytes per unit, as libvirt's virScaleInteger (case-insensitive)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_MAX_KIB = 1 << 54  # far beyond any page size; keeps junk from becoming huge ints
#: the host's base page: a "hugepage" of this size is ordinary memory to libvirt
SYSTEM_PAGE_KIB = mmap.PAGESIZE // 1024
_VFIO = "/dev/vfio/vfio"
_TUN = "/dev/net/tun"
_VHOST_NET = "/dev/vhost-net"
_MAPPER_CONTROL = "/dev/mapper/control"
_TAP_TYPES = {"ethernet", "bridge", "network"}
_CHARDEV_TAGS = ("serial", "parallel", "channel", "console")
_VIRTIO_NIC = {"virtio", "virtio-transitional", "virtio-non-transitional"}
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                   r"[0-9a-fA-F]{12}")
_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,8}")
_DEC = re.compile(r"[0-9]{1,10}")


# ----------------------------------------------------------------------- results
@dataclass(frozen=True)
class HostLookup:
    """A node only the host can name.  ``kind`` and ``key``:

    * ``pci``  ("DDDD:BB:SS.F",)       -> /dev/vfio/<iommu_group>
    * ``mdev`` ("uuid",)               -> /dev/vfio/<iommu_group>
    * ``scsi`` (host, bus, target, unit) -> /dev/sgN
    * ``usb``  (vendor, product)       -> /dev/bus/usb/BBB/DDD (hex ids)
    * ``rendernode`` ()                -> the first /dev/dri/renderD* (libvirt's pick)
    """

    kind: str
    key: tuple[str, ...] = ()

    def describe(self) -> str:
        what = {"pci": "PCI device", "mdev": "mediated device", "scsi": "SCSI address",
                "usb": "USB device", "rendernode": "DRM render node"}.get(self.kind, self.kind)
        sep = ":" if self.kind in ("scsi", "usb") else " "
        return f"{what} {sep.join(self.key)}".strip()


@dataclass(frozen=True)
class Derived:
    """One thing the domain needs: a /dev path, or a host lookup naming one."""

    origin: str           # the XML element it came from, for the report
    path: str | None = None
    required: bool = True
    lookup: HostLookup | None = None


@dataclass
class Derivation:
    """Everything read from one ``<domain>``, before the host is consulted."""

    name: str | None = None
    domain_id: int | None = None
    uuid: str | None = None
    items: list[Derived] = field(default_factory=list)
    #: (KiB, origin); 0 = the default hugepage size
    hugepages: list[tuple[int, str]] = field(default_factory=list)
    #: DAC owner from a seclabel: (uid, gid), or the raw label when it uses names
    owner: tuple[int, int] | None = None
    owner_label: str | None = None
    #: one line per device refused (a path reaching /dev through '..', a bad address)
    refused: list[str] = field(default_factory=list)
    #: things worth telling the admin that are no error (a storage-pool volume, ...)
    notes: list[str] = field(default_factory=list)

    def add(self, origin: str, path: str | None, required: bool = True) -> None:
        node, why = dev_path_of(path, what=f"{origin}: path")
        if why is not None:
            self.refused.append(why)
        elif node is not None:
            self.items.append(Derived(origin, node, required))

    def fixed(self, origin: str, path: str, required: bool = True) -> None:
        self.items.append(Derived(origin, path, required))

    def lookup(self, origin: str, kind: str, key: tuple[str, ...],
               required: bool = True) -> None:
        self.items.append(Derived(origin, None, required, HostLookup(kind, key)))

    @property
    def hugepage_sizes(self) -> tuple[int, ...]:
        out: list[int] = []
        for kib, _ in self.hugepages:
            if kib not in out:
                out.append(kib)
        return tuple(out)

    def device_requests(self, resolved: dict[HostLookup, list[str]] | None = None
                        ) -> tuple[DeviceRequest, ...]:
        """Requests in derivation order; lookups contribute what ``resolved`` says."""
        reqs: list[DeviceRequest] = []
        for it in self.items:
            if it.path is not None:
                reqs.append(DeviceRequest(it.path, it.required))
            elif it.lookup is not None and resolved is not None:
                reqs.extend(DeviceRequest(p, it.required) for p in resolved.get(it.lookup, ()))
        return dedupe(reqs)

    def to_spec(self, *, source: str, resolved: dict[HostLookup, list[str]] | None = None,
                uid: int | None = None, gid: int | None = None,
                default_devices: tuple[str, ...] | None = None) -> VmSpec:
        own_uid, own_gid = self.owner if self.owner is not None else (0, 0)
        kw = {} if default_devices is None else {"default_devices": default_devices}
        return VmSpec(name=self.name, domain_id=self.domain_id, uuid=self.uuid,
                      devices=self.device_requests(resolved), hugepages=self.hugepage_sizes,
                      uid=own_uid if uid is None else uid, gid=own_gid if gid is None else gid,
                      source=source, refused=tuple(self.refused), **kw)


# ----------------------------------------------------------------------- parsing
def _parse(text: str) -> ET.Element:
    """Parse untrusted XML text with defusedxml; SpecError on any problem."""
    if not isinstance(text, str):
        raise SpecError(f"XML must be text, not {type(text).__name__}")
    try:  # imported here: the rootless launcher runs on the standard library alone
        import defusedxml.ElementTree as DET
        from defusedxml import DefusedXmlException
    except ImportError:
        raise NsmountError("reading libvirt XML needs defusedxml, which this Python lacks",
                           hint="install python3-defusedxml, use nsmount's virtualenv, or "
                           "give a --spec file instead") from None
    try:
        return cast(ET.Element, DET.fromstring(text, forbid_dtd=True))
    except DefusedXmlException as exc:
        raise SpecError(f"XML refused: {_first_line(exc)}") from None
    except ET.ParseError as exc:
        raise SpecError(f"malformed XML: {_first_line(exc)}") from None
    except (ValueError, UnicodeError, LookupError) as exc:
        raise SpecError(f"malformed XML: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:200] if text.strip() else type(exc).__name__


def _nonneg_int(value: str, what: str) -> int:
    """Strict decimal: int() would also take ' 1', '1_0' and non-ASCII digits."""
    if not _UINT.fullmatch(value):
        raise SpecError(f"{what} {value[:40]!r} is not a (reasonably sized) "
                        "non-negative integer")
    return int(value)


def _c_uint(value: str | None) -> int | None:
    """libvirt's strtoul(base 0) for addresses: '0x1f', '017' (octal), '31'; else None."""
    if value is None:
        return None
    v = value.strip()
    if _HEX.fullmatch(v):
        return int(v, 16)
    if _DEC.fullmatch(v):
        return int(v, 8) if len(v) > 1 and v[0] == "0" and set(v) <= set("01234567") \
            else int(v)
    return None


# ------------------------------------------------------------------- public API
def derive_domain_xml(text: str) -> Derivation:
    """Read a ``<domain>`` (inactive or live) or a ``<domstatus>`` document."""
    root = _parse(text)
    if root.tag == "domstatus":
        return _derive(_status_domain(root)[1])
    if root.tag != "domain":
        raise SpecError(f"expected a <domain> document, found <{_tag(root)}>")
    return _derive(root)


def derive_status_xml(text: str) -> tuple[int, Derivation]:
    """libvirt's status XML (``/run/libvirt/qemu/<name>.xml``): (QEMU pid, derivation)."""
    root = _parse(text)
    if root.tag != "domstatus":
        raise SpecError(f"expected a <domstatus> document, found <{_tag(root)}>")
    pid, dom = _status_domain(root)
    return pid, _derive(dom)


def spec_from_domain_xml(text: str, *, source: str = "domain-xml") -> VmSpec:
    """The VmSpec of a domain, without consulting the host (host lookups are left out;
    :func:`nsmount.state.libvirtspec.spec_from_domain_xml` resolves them)."""
    return derive_domain_xml(text).to_spec(source=source)


def spec_from_status_xml(text: str) -> tuple[int, VmSpec]:
    pid, d = derive_status_xml(text)
    return pid, d.to_spec(source="libvirt-status")


def _status_domain(root: ET.Element) -> tuple[int, ET.Element]:
    pid_text = root.get("pid")
    if pid_text is None:
        raise SpecError("status XML has no pid attribute")
    pid = _nonneg_int(pid_text, "status XML pid")
    if pid == 0:
        raise SpecError("status XML pid is 0")
    domains = root.findall("domain")
    if len(domains) != 1:
        raise SpecError(f"status XML must hold exactly one <domain>, found {len(domains)}")
    return pid, domains[0]


def _tag(el: ET.Element) -> str:
    return str(el.tag)[:40]


def dedupe(reqs: list[DeviceRequest]) -> tuple[DeviceRequest, ...]:
    """First occurrence keeps its place; a required duplicate upgrades an optional one."""
    seen: dict[str, DeviceRequest] = {}
    for r in reqs:
        old = seen.get(r.path)
        if old is None or (r.required and not old.required):
            seen[r.path] = r
    return tuple(seen.values())


# ------------------------------------------------------------------- extraction
def _derive(dom: ET.Element) -> Derivation:
    d = Derivation(name=dom.findtext("name") or None,
                   uuid=(dom.findtext("uuid") or "").strip() or None,
                   domain_id=_domain_id(dom))
    _dac_owner(dom, d)
    devices = dom.find("devices")
    if devices is not None:
        _devices(devices, d)
    _loader(dom, d)
    for ls in dom.findall("launchSecurity"):
        if ls.get("type") in ("sev", "sev-snp"):
            d.fixed(f"<launchSecurity type='{ls.get('type')}'>", "/dev/sev")
    _commandline_passthrough(dom, d)
    _hugepages(dom, d)
    return d


def _domain_id(dom: ET.Element) -> int | None:
    """``id`` is only present on running domains; libvirt writes -1 for inactive ones."""
    raw = dom.get("id")
    if raw is None or raw.strip() == "-1":
        return None
    return _nonneg_int(raw.strip(), "domain id")


def _devices(devices: ET.Element, d: Derivation) -> None:
    for disk in devices.findall("disk"):
        _disk(disk, d)
    for hostdev in devices.findall("hostdev"):
        _hostdev(hostdev, d, "<hostdev>")
    for mem in devices.findall("memory"):
        _memory(mem, d)
    for tag in _CHARDEV_TAGS:
        for i, chardev in enumerate(devices.findall(tag)):
            _chardev(chardev, d, f"<{tag}> #{i}")
    for tpm in devices.findall("tpm"):
        backend = tpm.find("backend")
        if backend is not None and backend.get("type") == "passthrough":
            device = backend.find("device")
            if device is None:
                device = backend.find("source")
            path = device.get("path") if device is not None else None
            # no path: libvirt's default passthrough device
            d.add("<tpm> passthrough backend", path or "/dev/tpm0")
    for gfx in devices.findall("graphics"):
        _graphics(gfx, d)
    for i, video in enumerate(devices.findall("video")):
        model = video.find("model")
        if model is None:
            continue
        if model.get("blob") == "on":
            d.fixed(f"<video> #{i} <model blob='on'>", "/dev/udmabuf")
        accel = model.find("acceleration")
        if accel is not None:
            d.add(f"<video> #{i} <acceleration rendernode>", accel.get("rendernode"))
    for inp in devices.findall("input"):
        src = inp.find("source")
        kind = inp.get("type")
        if src is not None and kind in ("evdev", "passthrough"):
            d.add(f"<input type='{kind}'>",
                  src.get("dev") if kind == "evdev" else src.get("evdev"))
    for rng in devices.findall("rng"):
        _rng(rng, d)
    for iface in devices.findall("interface"):
        _interface(iface, d)


# ---------------------------------------------------------------------- storage
def _disk(disk: ET.Element, d: Derivation) -> None:
    target = disk.find("target")
    tdev = target.get("dev") if target is not None else None
    label = f"<disk> {tdev}" if tdev else "<disk>"
    src = disk.find("source")
    # startupPolicy='optional': libvirt drops a missing source instead of failing
    required = src is None or src.get("startupPolicy") != "optional"
    _storage_chain(disk, d, label, required)
    mirror = disk.find("mirror")
    if mirror is not None:
        if mirror.find("source") is None and mirror.get("file"):  # pre-1.2.6 syntax
            d.add(f"{label} <mirror>", mirror.get("file"))
        else:
            _storage_chain(mirror, d, f"{label} <mirror>", True)


def _storage_chain(top: ET.Element, d: Derivation, label: str, required: bool) -> None:
    """A source and its whole ``<backingStore>`` chain (walked iteratively)."""
    store: ET.Element | None = top
    depth = 0
    nvme = False
    while store is not None:
        where = label if depth == 0 else f"{label} <backingStore> #{depth}"
        kind = store.get("type") or "file"  # no type: libvirt means a file
        src = store.find("source")
        if src is not None:
            if kind == "nvme":
                nvme = True
                addr = _pci_address(src.find("address"))
                if addr is None:
                    d.refused.append(f"{where}: NVMe disk without a valid PCI address")
                else:
                    d.lookup(f"{where} nvme", "pci", (addr,), required)
            elif kind in ("file", "block", "dir"):
                attr = {"file": "file", "block": "dev", "dir": "dir"}[kind]
                d.add(f"{where} source {attr}", src.get(attr), required)
            elif kind == "volume" and (src.get("pool") or src.get("volume")):
                d.notes.append(f"{where}: volume {src.get('pool')}/{src.get('volume')} "
                               "is resolved by libvirt's storage pool, not from the XML")
            if depth == 0 and src.find("reservations") is not None:
                # qemu-pr-helper (managed or not) may need it; libvirt adds it either way
                d.fixed(f"{where} <reservations>", _MAPPER_CONTROL, required=False)
        store = store.find("backingStore")
        depth += 1
    if nvme:
        d.fixed(f"{label} nvme", _VFIO)


def _loader(dom: ET.Element, d: Derivation) -> None:
    os_el = dom.find("os")
    if os_el is None:
        return
    loader = os_el.find("loader")
    if loader is not None:
        d.add("<os><loader>", (loader.text or "").strip() or None)
    nvram = os_el.find("nvram")
    if nvram is not None:
        if nvram.get("type") is None and nvram.find("source") is None:
            d.add("<os><nvram>", (nvram.text or "").strip() or None)
        else:
            _storage_chain(nvram, d, "<os><nvram>", True)


# ---------------------------------------------------------------------- hostdevs
def _pci_address(addr: ET.Element | None) -> str | None:
    if addr is None:
        return None
    dom, bus, slot, fn = (_c_uint(addr.get(k)) for k in ("domain", "bus", "slot", "function"))
    dom = 0 if addr.get("domain") is None else dom
    if None in (dom, bus, slot, fn):
        return None
    assert dom is not None and bus is not None and slot is not None and fn is not None
    if dom > 0xFFFF or bus > 0xFF or slot > 0x1F or fn > 7:
        return None
    return f"{dom:04x}:{bus:02x}:{slot:02x}.{fn:x}"


def _hostdev(hostdev: ET.Element, d: Derivation, label: str) -> None:
    """``qemuDomainGetHostdevPath``: the node each subsystem hostdev needs."""
    if hostdev.get("mode", "subsystem") != "subsystem":
        return  # capabilities mode is for containers, not QEMU
    kind = hostdev.get("type")
    src = hostdev.find("source")
    where = f"{label} type='{kind}'"
    if kind == "pci":
        driver = hostdev.find("driver")
        if driver is not None and driver.get("name") not in (None, "vfio"):
            return  # legacy KVM/Xen assignment: no VFIO group
        addr = _pci_address(src.find("address") if src is not None else None)
        if addr is None:
            d.refused.append(f"{where}: no valid PCI address")
        else:
            d.lookup(where, "pci", (addr,))
        d.fixed(where, _VFIO)
    elif kind == "mdev":
        a = src.find("address") if src is not None else None
        uuid = (a.get("uuid") or "") if a is not None else ""
        if not _UUID.fullmatch(uuid):
            d.refused.append(f"{where}: no valid mdev UUID")
        else:
            d.lookup(where, "mdev", (uuid.lower(),))
        d.fixed(where, _VFIO)
    elif kind == "usb" and src is not None:
        required = src.get("startupPolicy") != "optional"
        a = src.find("address")
        bus, dev = (_c_uint(a.get("bus")), _c_uint(a.get("device"))) if a is not None \
            else (None, None)
        if bus is not None and dev is not None and bus < 1000 and dev < 1000:
            d.fixed(where, f"/dev/bus/usb/{bus:03d}/{dev:03d}", required)
            return
        vendor, product = src.find("vendor"), src.find("product")
        vid = _c_uint(vendor.get("id")) if vendor is not None else None
        pid = _c_uint(product.get("id")) if product is not None else None
        if vid is not None and pid is not None:
            d.lookup(where, "usb", (f"{vid:04x}", f"{pid:04x}"), required)
        else:
            d.refused.append(f"{where}: neither bus/device nor vendor/product")
    elif kind == "scsi" and src is not None:
        if src.get("protocol") == "iscsi":
            return  # network storage: nothing in /dev
        adapter = src.find("adapter")
        a = src.find("address")
        name = (adapter.get("name") or "") if adapter is not None else ""
        host = name.removeprefix("scsi_host")
        nums = [_c_uint(a.get(k)) if a is not None else None for k in ("bus", "target", "unit")]
        if not _DEC.fullmatch(host) or any(n is None for n in nums):
            d.refused.append(f"{where}: no valid adapter and address")
        else:
            d.lookup(where, "scsi", (str(int(host)), *(str(n) for n in nums)))
    elif kind == "scsi_host" and src is not None and src.get("protocol") == "vhost":
        d.fixed(where, "/dev/vhost-scsi")


def _interface(iface: ET.Element, d: Derivation) -> None:
    """``type='hostdev'`` (also a network's ``<actual type='hostdev'>`` in live XML) is
    a PCI hostdev; tap-backed NICs may open /dev/net/tun and /dev/vhost-net.

    The tap nodes are optional: under libvirt, libvirtd opens them and passes the
    fds to QEMU.  vhost is used when asked for (``<driver name='vhost'/>``) or by
    default for virtio models unless ``<driver name='qemu'/>`` turns it off.
    """
    kind = iface.get("type")
    actual = iface.find("actual")
    src_el: ET.Element | None = iface
    if kind == "network" and actual is not None and actual.get("type") == "hostdev":
        kind, src_el = "hostdev", actual
    if kind == "hostdev":
        src = src_el.find("source") if src_el is not None else None
        addr_el = src.find("address") if src is not None else None
        if addr_el is not None and addr_el.get("type") == "usb":
            return  # not supported by libvirt for QEMU; nothing to add
        addr = _pci_address(addr_el)
        if addr is None:
            d.refused.append("<interface type='hostdev'>: no valid PCI address")
        else:
            d.lookup("<interface type='hostdev'>", "pci", (addr,))
        d.fixed("<interface type='hostdev'>", _VFIO)
        return
    if kind not in _TAP_TYPES:
        return
    where = f"<interface type='{kind}'>"
    d.fixed(where, _TUN, required=False)
    driver = iface.find("driver")
    drv_name = driver.get("name") if driver is not None else None
    model = iface.find("model")
    virtio = model is not None and model.get("type") in _VIRTIO_NIC
    if drv_name == "vhost" or (virtio and drv_name != "qemu"):
        d.fixed(where, _VHOST_NET, required=False)


# -------------------------------------------------------------------- the rest
def _memory(mem: ET.Element, d: Derivation) -> None:
    model = mem.get("model")
    where = f"<memory model='{model}'>"
    if model in ("nvdimm", "virtio-pmem"):
        d.add(where, (mem.findtext("source/path") or "").strip() or None)
    elif model == "sgx-epc":
        d.fixed(where, "/dev/sgx_vepc")
        d.fixed(where, "/dev/sgx_provision", required=False)
    elif model in ("dimm", "virtio-mem"):
        page = mem.find("source/pagesize")
        if page is not None:
            kib = _scaled_kib((page.text or "").strip(), (page.get("unit") or "").strip())
            if kib != SYSTEM_PAGE_KIB and kib != 0:
                d.hugepages.append((kib, f"{where} <pagesize>"))


def _chardev(chardev: ET.Element, d: Derivation, where: str) -> None:
    """libvirt's chardev rule: the source path of dev, file, pipe and (connecting)
    unix chardevs.  A pty is allocated by QEMU under /dev/pts (a host submount)."""
    kind = chardev.get("type")
    src = chardev.find("source")
    if src is None or kind not in ("dev", "file", "pipe", "unix"):
        return
    if kind == "unix" and src.get("mode", "connect") == "bind":
        return  # a socket QEMU creates itself
    # dev: QEMU opens a host node; file/pipe/unix may be created by QEMU itself
    d.add(f"{where} type='{kind}'", src.get("path"), required=kind == "dev")


def _graphics(gfx: ET.Element, d: Derivation) -> None:
    kind = gfx.get("type")
    gl = gfx.find("gl")
    if gl is None:
        return
    where = f"<graphics type='{kind}'> <gl>"
    node = gl.get("rendernode")
    if node:
        d.add(where, node)
    elif kind == "egl-headless" or (kind in ("spice", "dbus") and gl.get("enable") == "yes"):
        # libvirt picks a render node at start and writes it into the live XML
        d.lookup(where, "rendernode", ())


def _rng(rng: ET.Element, d: Derivation) -> None:
    backend = rng.find("backend")
    if backend is None:
        return
    model = backend.get("model")
    if model == "random":
        # no text means libvirt's default, /dev/urandom (already a default device)
        d.add("<rng> random backend", (backend.text or "").strip() or None)
    elif model == "egd":
        _chardev(backend, d, "<rng> egd backend")


def _commandline_passthrough(dom: ET.Element, d: Derivation) -> None:
    """Devices named by ``<qemu:commandline>`` args (passthrough the XML cannot describe)."""
    args = [a.get("value") or "" for a in dom.findall(f"{_QEMU_NS}commandline/{_QEMU_NS}arg")]
    if not args:
        return
    from .qemu_cmdline import spec_from_cmdline

    spec = spec_from_cmdline(["qemu"] + args)
    for r in spec.devices:
        d.fixed("<qemu:commandline>", r.path, r.required)
    d.refused.extend(f"<qemu:commandline>: {why}" for why in spec.refused)


# ------------------------------------------------------------------- hugepages
def _hugepages(dom: ET.Element, d: Derivation) -> None:
    """Sizes in KiB from ``<memoryBacking><hugepages>`` (before any per-DIMM sizes);
    0 = the default size.  A page of the host's base size is ordinary memory."""
    hp = dom.find("memoryBacking/hugepages")
    if hp is None:
        return
    sizes: list[tuple[int, str]] = []
    pages = hp.findall("page")
    for page in pages:
        size = page.get("size")
        if size is None:
            raise SpecError("<hugepages><page> without a size")
        kib = _scaled_kib(size.strip(), (page.get("unit") or "").strip())
        if kib == 0:
            raise SpecError("hugepage size must not be zero")
        if kib != SYSTEM_PAGE_KIB:
            sizes.append((kib, "<memoryBacking><hugepages><page>"))
    if not pages:
        sizes.append((0, "<memoryBacking><hugepages/>"))
    d.hugepages[:0] = sizes


def _scaled_kib(value: str, unit: str) -> int:
    """libvirt's virScaleInteger, then bytes -> KiB rounded up (as libvirt does).

    Units: '' (KiB, libvirt's default for memory), b/byte/bytes, k/KiB/KB, M/MiB/MB,
    G, T, P, E; 'XiB' and bare 'X' are powers of 1024, 'XB' powers of 1000; case
    does not matter.
    """
    number = _nonneg_int(value, "hugepage size")
    u = unit.lower()
    if u == "":
        factor = 1024
    elif u in ("b", "byte", "bytes"):
        factor = 1
    elif u[0] in _POWERS and u[1:] in ("", "ib", "b"):
        base = 1000 if u[1:] == "b" else 1024
        factor = base ** _POWERS[u[0]]
    else:
        raise SpecError(f"unknown hugepage size unit {unit[:20]!r}")
    kib = -(-number * factor // 1024)
    if kib > _MAX_KIB:
        raise SpecError(f"hugepage size {value[:40]} {unit[:20]} is absurdly large")
    return kib


# ------------------------------------------------------------------- ownership
def _dac_owner(dom: ET.Element, d: Derivation) -> None:
    """uid/gid QEMU runs as, from the DAC seclabel (``+107:+107``).

    Static labels count too: they name the user QEMU runs as just the same.  A
    label using user/group names is kept raw (``owner_label``): resolving it needs
    the host's passwd database, which a parser must not consult.
    """
    for sl in dom.findall("seclabel"):
        if sl.get("model") != "dac" or sl.get("type") not in ("dynamic", "static"):
            continue
        for tag in ("label", "imagelabel"):
            text = (sl.findtext(tag) or "").strip()
            m = re.fullmatch(r"\+?([0-9]{1,10}):\+?([0-9]{1,10})", text)
            if m:
                uid, gid = int(m.group(1)), int(m.group(2))
                if uid < 1 << 32 and gid < 1 << 32:
                    d.owner = (uid, gid)
                    return
            elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}:[A-Za-z_][A-Za-z0-9_.-]{0,31}",
                              text) and d.owner_label is None:
                d.owner_label = text
