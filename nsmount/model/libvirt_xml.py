"""VmSpec from libvirt's domain XML and status XML.

libvirt decides which nodes a VM's private /dev gets from its domain definition
(disks and backing chains, hostdevs, chardevs, TPM, RNG, evdev, render nodes,
SEV ...).  We read the same definition so nsmount can build or repair that /dev
without asking libvirtd.  Only paths under /dev become device requests: anything
else is not ours to create (a disk image in /var/lib is reached through the host's
mounts, not through the VM's /dev).

Security: the XML may come from a file an admin points us at or a hook's stdin,
so it is untrusted text.  ElementTree expands internal entities, which allows
"billion laughs", so any DTD or entity declaration is refused before parsing.
Every problem surfaces as :class:`SpecError` with a one-line message.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from ..errors import SpecError
from .paths import canonical, is_strictly_within
from .spec import DeviceRequest, VmSpec

_QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
_FORBIDDEN = ("<!doctype", "<!entity")
_UINT = re.compile(r"[0-9]{1,20}")  # bounded: int() refuses >4300 digits
#: unit suffix -> bytes per unit, as libvirt's virScaleInteger (case-insensitive)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_MAX_KIB = 1 << 54  # far beyond any page size; keeps junk from becoming huge ints
_VFIO = "/dev/vfio/vfio"
_TUN = "/dev/net/tun"
_VHOST_NET = "/dev/vhost-net"
_TAP_TYPES = {"ethernet", "bridge", "network"}
_CHARDEV_TAGS = ("serial", "parallel", "console", "channel")
_VIRTIO_NIC = {"virtio", "virtio-transitional", "virtio-non-transitional"}


# ----------------------------------------------------------------------- parsing
def _parse(text: str) -> ET.Element:
    """Parse untrusted XML text, refusing DTDs/entities; SpecError on any problem."""
    if not isinstance(text, str):
        raise SpecError(f"XML must be text, not {type(text).__name__}")
    low = text.lower()
    if any(bad in low for bad in _FORBIDDEN):
        raise SpecError("XML with a DOCTYPE or ENTITY declaration is refused")
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise SpecError(f"malformed XML: {exc}") from None
    except (ValueError, UnicodeError, LookupError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"malformed XML: {msg}") from None


def _nonneg_int(value: str, what: str) -> int:
    """Strict decimal: int() would also take ' 1', '1_0' and non-ASCII digits."""
    if not _UINT.fullmatch(value):
        raise SpecError(f"{what} {value[:40]!r} is not a (reasonably sized) "
                        "non-negative integer")
    return int(value)


# ------------------------------------------------------------------- public API
def spec_from_domain_xml(text: str, *, source: str = "domain-xml") -> VmSpec:
    """Parse a libvirt ``<domain>`` definition (inactive or live XML).

    A ``<domstatus>`` document is accepted too (its inner ``<domain>`` is used),
    so a status file handed to ``--domain-xml`` does what the admin meant.
    """
    root = _parse(text)
    if root.tag == "domstatus":
        return _status_parts(root, source=source)[1]
    if root.tag != "domain":
        raise SpecError(f"expected a <domain> document, found <{_tag(root)}>")
    return _spec_from_domain(root, source)


def spec_from_status_xml(text: str) -> tuple[int, VmSpec]:
    """Parse libvirt's status XML (``/run/libvirt/qemu/<name>.xml``): (QEMU pid, spec)."""
    root = _parse(text)
    if root.tag != "domstatus":
        raise SpecError(f"expected a <domstatus> document, found <{_tag(root)}>")
    return _status_parts(root, source="libvirt-status")


def _status_parts(root: ET.Element, *, source: str) -> tuple[int, VmSpec]:
    pid_text = root.get("pid")
    if pid_text is None:
        raise SpecError("status XML has no pid attribute")
    pid = _nonneg_int(pid_text, "status XML pid")
    if pid == 0:
        raise SpecError("status XML pid is 0")
    domains = root.findall("domain")
    if len(domains) != 1:
        raise SpecError(f"status XML must hold exactly one <domain>, found {len(domains)}")
    return pid, _spec_from_domain(domains[0], source)


def _tag(el: ET.Element) -> str:
    return str(el.tag)[:40]


# ------------------------------------------------------------------- extraction
def _spec_from_domain(dom: ET.Element, source: str) -> VmSpec:
    name = dom.findtext("name") or None
    uuid = (dom.findtext("uuid") or "").strip() or None
    uid, gid = _dac_owner(dom)
    reqs: list[DeviceRequest] = []
    devices = dom.find("devices")
    if devices is not None:
        reqs.extend(_device_requests(devices))
    reqs.extend(_launch_security(dom))
    reqs.extend(_commandline_passthrough(dom))
    return VmSpec(name=name, domain_id=_domain_id(dom), uuid=uuid, devices=_dedupe(reqs),
                  hugepages=_hugepages(dom), uid=uid, gid=gid, source=source)


def _domain_id(dom: ET.Element) -> int | None:
    """``id`` is only present on running domains; libvirt writes -1 for inactive ones."""
    raw = dom.get("id")
    if raw is None or raw.strip() == "-1":
        return None
    return _nonneg_int(raw.strip(), "domain id")


def _dedupe(reqs: list[DeviceRequest]) -> tuple[DeviceRequest, ...]:
    """First occurrence keeps its place; a required duplicate upgrades an optional one."""
    seen: dict[str, DeviceRequest] = {}
    for r in reqs:
        old = seen.get(r.path)
        if old is None or (r.required and not old.required):
            seen[r.path] = r
    return tuple(seen.values())


def _dev(path: str | None, required: bool = True) -> Iterator[DeviceRequest]:
    """A request for ``path`` when it is under /dev.

    Every path is canonicalised first, so '..' or a relative path anywhere is a
    SpecError (``/var/../dev/sda`` must not slip past as "not under /dev").
    """
    if path is None or path == "":
        return
    p = canonical(path, what="device path")
    if is_strictly_within(p, "/dev"):
        yield DeviceRequest(p, required)


def _device_requests(devices: ET.Element) -> Iterator[DeviceRequest]:
    for disk in devices.findall("disk"):
        yield from _disk(disk)
    for hostdev in devices.findall("hostdev"):
        yield from _hostdev(hostdev)
    for tpm in devices.findall("tpm"):
        backend = tpm.find("backend")
        if backend is not None and backend.get("type") == "passthrough":
            device = backend.find("device")
            yield from _dev(device.get("path") if device is not None else "/dev/tpm0")
    for rng in devices.findall("rng"):
        yield from _rng(rng)
    for tag in _CHARDEV_TAGS:
        for chardev in devices.findall(tag):
            yield from _chardev_source(chardev)
    for iface in devices.findall("interface"):
        yield from _interface(iface)
    for inp in devices.findall("input"):
        src = inp.find("source")
        if src is not None and inp.get("type") in ("evdev", "passthrough"):
            yield from _dev(src.get("dev") if inp.get("type") == "evdev" else src.get("evdev"))
    for gl in devices.findall("graphics/gl"):
        yield from _dev(gl.get("rendernode"))
    for accel in devices.findall("video/model/acceleration"):
        yield from _dev(accel.get("rendernode"))
    for mem in devices.findall("memory"):
        model = mem.get("model")
        if model in ("nvdimm", "virtio-pmem"):
            yield from _dev(mem.findtext("source/path"))
        elif model == "sgx-epc":
            yield DeviceRequest("/dev/sgx_vepc")


def _disk(disk: ET.Element) -> Iterator[DeviceRequest]:
    """The disk's source and its whole ``<backingStore>`` chain (walked iteratively)."""
    if disk.get("type") == "nvme":
        yield DeviceRequest(_VFIO)
        return
    store: ET.Element | None = disk
    while store is not None:
        kind = store.get("type")
        src = store.find("source")
        if src is not None:
            if kind == "block":
                yield from _dev(src.get("dev"))
            elif kind == "file":
                yield from _dev(src.get("file"))
            if src.find("reservations[@managed='yes']") is not None:
                yield DeviceRequest("/dev/mapper/control")
        store = store.find("backingStore")


def _hostdev(hostdev: ET.Element) -> Iterator[DeviceRequest]:
    """PCI and mdev hostdevs need the VFIO container; the group is not in the XML.

    The group number (``/dev/vfio/N``) comes from the host's sysfs
    (``/sys/bus/pci/devices/<addr>/iommu_group``), which a pure parser cannot
    read; the caller adds it.  SCSI, scsi_host and USB hostdevs are skipped: their
    nodes (``/dev/sgN``, ``/dev/vhost-scsi``, ``/dev/bus/usb/...``) likewise need
    host lookups.
    """
    if hostdev.get("mode", "subsystem") == "subsystem" and hostdev.get("type") in ("pci", "mdev"):
        yield DeviceRequest(_VFIO)


def _rng(rng: ET.Element) -> Iterator[DeviceRequest]:
    backend = rng.find("backend")
    if backend is None:
        return
    model = backend.get("model")
    if model == "random":
        # no text means libvirt's default, /dev/urandom (already a default device)
        yield from _dev((backend.text or "").strip() or None)
    elif model == "egd":
        yield from _chardev_source(backend)


def _chardev_source(chardev: ET.Element) -> Iterator[DeviceRequest]:
    """Only ``type='dev'`` chardevs open a host node (pty/unix/file do not)."""
    if chardev.get("type") == "dev":
        src = chardev.find("source")
        if src is not None:
            yield from _dev(src.get("path"))


def _interface(iface: ET.Element) -> Iterator[DeviceRequest]:
    """Tap-backed NICs may open /dev/net/tun and /dev/vhost-net.

    Both are optional: under libvirt, libvirtd opens them and passes the fds to
    QEMU, so a host without vhost-net (or a namespace without the node) still runs.
    vhost is used when asked for (``<driver name='vhost'/>``) or by default for
    virtio models unless ``<driver name='qemu'/>`` turns it off.
    """
    kind = iface.get("type")
    if kind == "hostdev":
        yield DeviceRequest(_VFIO)
        return
    if kind not in _TAP_TYPES:
        return
    yield DeviceRequest(_TUN, required=False)
    driver = iface.find("driver")
    drv_name = driver.get("name") if driver is not None else None
    model = iface.find("model")
    virtio = model is not None and model.get("type") in _VIRTIO_NIC
    if drv_name == "vhost" or (virtio and drv_name != "qemu"):
        yield DeviceRequest(_VHOST_NET, required=False)


def _launch_security(dom: ET.Element) -> Iterator[DeviceRequest]:
    for ls in dom.findall("launchSecurity"):
        if ls.get("type") in ("sev", "sev-snp"):
            yield DeviceRequest("/dev/sev")


def _commandline_passthrough(dom: ET.Element) -> Iterator[DeviceRequest]:
    """Devices named by ``<qemu:commandline>`` args (passthrough the XML cannot describe)."""
    args = [a.get("value") or "" for a in dom.findall(f"{_QEMU_NS}commandline/{_QEMU_NS}arg")]
    if not args:
        return
    from .qemu_cmdline import spec_from_cmdline

    yield from spec_from_cmdline(["qemu"] + args).devices


# ------------------------------------------------------------------- hugepages
def _hugepages(dom: ET.Element) -> tuple[int, ...]:
    """Sizes in KiB from ``<memoryBacking><hugepages>``; (0,) = the default size."""
    hp = dom.find("memoryBacking/hugepages")
    if hp is None:
        return ()
    sizes: list[int] = []
    for page in hp.findall("page"):
        size = page.get("size")
        if size is None:
            raise SpecError("<hugepages><page> without a size")
        kib = _scaled_kib(size.strip(), (page.get("unit") or "").strip())
        if kib == 0:
            raise SpecError("hugepage size must not be zero")
        if kib not in sizes:
            sizes.append(kib)
    return tuple(sizes) or (0,)


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
def _dac_owner(dom: ET.Element) -> tuple[int, int]:
    """uid/gid QEMU runs as, from the DAC seclabel (``+107:+107``), else (0, 0).

    Static labels count too: they name the user QEMU runs as just the same.  Labels
    using user/group names are left at 0/0: resolving them needs the host's passwd
    database, which a parser must not consult.
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
                    return uid, gid
    return 0, 0
