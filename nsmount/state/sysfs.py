"""Host lookups libvirt does through sysfs, each taking the sysfs root as a parameter
(tests pass a fake tree in a temporary directory).

* VFIO group of a PCI device or a mediated device: the basename of the
  ``iommu_group`` link (``/sys/bus/pci/devices/0000:06:12.5/iommu_group ->
  ../../../kernel/iommu_groups/12`` means ``/dev/vfio/12``);
* SCSI generic node of a SCSI address: ``/sys/bus/scsi/devices/H:B:T:U/scsi_generic/sgN``;
* USB device by vendor/product: ``idVendor``/``idProduct``/``busnum``/``devnum``;
* device-mapper targets of a block device: ``/sys/dev/block/M:m/dm`` marks a dm
  device, ``slaves/`` names what it maps onto (followed recursively, as libvirt's
  ``virDevMapperGetTargets`` does);
* the DRM render node libvirt would pick (the first ``/dev/dri/renderD*``).

Every lookup returns None or an empty list when the host does not have the thing;
names read from sysfs are validated before they become /dev paths.
"""

from __future__ import annotations

import os
import re

_GROUP = re.compile(r"[0-9]{1,9}")
_SG = re.compile(r"sg[0-9]{1,9}")
_KNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}")
_MAJMIN = re.compile(r"([0-9]{1,9}):([0-9]{1,9})")
_PCI = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
_UUID = re.compile(r"[0-9a-f-]{32,36}")
_MAX_DM_DEPTH = 16


def _read(path: str, limit: int = 256) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read(limit).strip()
    except OSError:
        return None


def _group_of(link: str) -> str | None:
    try:
        target = os.readlink(link)
    except OSError:
        return None
    name = os.path.basename(target.rstrip("/"))
    return f"/dev/vfio/{name}" if _GROUP.fullmatch(name) else None


def pci_vfio_group(addr: str, sysfs: str = "/sys") -> str | None:
    """``/dev/vfio/N`` for a PCI address ``DDDD:BB:SS.F``, or None when absent here."""
    if not _PCI.fullmatch(addr):
        return None
    return _group_of(os.path.join(sysfs, "bus/pci/devices", addr, "iommu_group"))


def mdev_vfio_group(uuid: str, sysfs: str = "/sys") -> str | None:
    if not _UUID.fullmatch(uuid):
        return None
    return _group_of(os.path.join(sysfs, "bus/mdev/devices", uuid, "iommu_group"))


def scsi_sg(host: int, bus: int, target: int, unit: int, sysfs: str = "/sys") -> str | None:
    """``/dev/sgN`` of SCSI address host:bus:target:unit (libvirt's virSCSIDeviceGetSgName)."""
    d = os.path.join(sysfs, "bus/scsi/devices", f"{host}:{bus}:{target}:{unit}",
                     "scsi_generic")
    try:
        names = sorted(n for n in os.listdir(d) if _SG.fullmatch(n))
    except OSError:
        return None
    return f"/dev/{names[0]}" if names else None


def usb_by_id(vendor: str, product: str, sysfs: str = "/sys") -> list[str]:
    """Every ``/dev/bus/usb/BBB/DDD`` whose idVendor/idProduct (hex) match."""
    base = os.path.join(sysfs, "bus/usb/devices")
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    want = (int(vendor, 16), int(product, 16))
    out: list[str] = []
    for e in entries:
        d = os.path.join(base, e)
        v, p = _read(os.path.join(d, "idVendor")), _read(os.path.join(d, "idProduct"))
        if v is None or p is None:
            continue
        try:
            if (int(v, 16), int(p, 16)) != want:
                continue
            bus = int(_read(os.path.join(d, "busnum")) or "x")
            dev = int(_read(os.path.join(d, "devnum")) or "x")
        except ValueError:
            continue
        if 0 <= bus < 1000 and 0 <= dev < 1000:
            out.append(f"/dev/bus/usb/{bus:03d}/{dev:03d}")
    return out


def dm_targets(major: int, minor: int, sysfs: str = "/sys") -> list[tuple[str, int, int]]:
    """(kernel name, major, minor) of every device a dm device maps onto, recursively
    (dm on dm on sda gives both); [] for a device that is not device-mapper."""
    out: list[tuple[str, int, int]] = []
    seen: set[tuple[int, int]] = {(major, minor)}
    todo = [(major, minor, 0)]
    while todo:
        maj, mnr, depth = todo.pop(0)
        node = os.path.join(sysfs, "dev/block", f"{maj}:{mnr}")
        if depth >= _MAX_DM_DEPTH or not os.path.isdir(os.path.join(node, "dm")):
            continue
        try:
            slaves = sorted(os.listdir(os.path.join(node, "slaves")))
        except OSError:
            continue
        for name in slaves:
            if not _KNAME.fullmatch(name):
                continue
            m = _MAJMIN.fullmatch(_read(os.path.join(node, "slaves", name, "dev")) or "")
            if m is None:
                continue
            key = (int(m.group(1)), int(m.group(2)))
            if key in seen:
                continue
            seen.add(key)
            out.append((name, *key))
            todo.append((*key, depth + 1))
    return out


def render_node(dev: str = "/dev") -> str | None:
    """The render node libvirt picks when the XML names none (first ``renderD*``)."""
    try:
        names = sorted(n for n in os.listdir(os.path.join(dev, "dri"))
                       if re.fullmatch(r"renderD[0-9]{1,6}", n))
    except OSError:
        return None
    return f"/dev/dri/{names[0]}" if names else None
