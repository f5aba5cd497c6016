"""Node-set parity with libvirt's qemu_namespace.c, one element kind at a time, each
with the device present on the (fake) host and absent from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nsmount.state.libvirtspec import HostContext, LoadedConf, spec_from_domain_xml
from nsmount.model.libvirt_xml import SYSTEM_PAGE_KIB, derive_domain_xml
from nsmount.model.qemu_conf import QemuConf

PCI = "<address domain='0x0000' bus='0x06' slot='0x12' function='0x5'/>"
MDEV_UUID = "c2177883-f1bb-47f0-914d-32a22e3a8804"


class Host:
    """A fake sysfs and /dev under tmp_path."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.sys.mkdir()
        self.dev.mkdir()

    def pci(self, addr: str, group: int) -> None:
        d = self.sys / "bus/pci/devices" / addr
        d.mkdir(parents=True)
        (self.sys / "kernel/iommu_groups" / str(group)).mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../kernel/iommu_groups/{group}", d / "iommu_group")

    def mdev(self, uuid: str, group: int) -> None:
        d = self.sys / "bus/mdev/devices" / uuid
        d.mkdir(parents=True)
        os.symlink(f"../../../kernel/iommu_groups/{group}", d / "iommu_group")

    def scsi(self, addr: str, sg: str) -> None:
        (self.sys / "bus/scsi/devices" / addr / "scsi_generic" / sg).mkdir(parents=True)

    def usb(self, name: str, vendor: str, product: str, bus: int, dev: int) -> None:
        d = self.sys / "bus/usb/devices" / name
        d.mkdir(parents=True)
        for key, val in (("idVendor", vendor), ("idProduct", product), ("busnum", str(bus)),
                         ("devnum", str(dev))):
            (d / key).write_text(val + "\n")

    def ctx(self, conf: LoadedConf | None = None) -> HostContext:
        return HostContext(str(self.sys), str(self.dev), conf or LoadedConf("qemu.conf"))


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def devs(xml: str, host: Host, conf: LoadedConf | None = None) -> list[tuple[str, bool]]:
    doc = f"<domain type='kvm'><name>t</name><devices>{xml}</devices></domain>"
    return [(d.path, d.required) for d in spec_from_domain_xml(doc, ctx=host.ctx(conf)).devices]


# --------------------------------------------------------------------- hostdevs
def test_pci_hostdev_vfio_group(host: Host) -> None:
    xml = f"<hostdev mode='subsystem' type='pci' managed='yes'><source>{PCI}</source></hostdev>"
    assert devs(xml, host) == [("/dev/vfio/vfio", True)]  # absent here: container only
    host.pci("0000:06:12.5", 12)
    assert devs(xml, host) == [("/dev/vfio/12", True), ("/dev/vfio/vfio", True)]


def test_pci_hostdev_address_forms_and_legacy_driver(host: Host) -> None:
    host.pci("0001:0a:1f.7", 3)
    xml = ("<hostdev mode='subsystem' type='pci'><driver name='vfio'/><source>"
           "<address domain='1' bus='0xa' slot='037' function='7'/></source></hostdev>")
    assert devs(xml, host) == [("/dev/vfio/3", True), ("/dev/vfio/vfio", True)]
    legacy = xml.replace("name='vfio'", "name='kvm'")
    assert devs(legacy, host) == []


def test_mdev_hostdev(host: Host) -> None:
    xml = (f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
           f"<address uuid='{MDEV_UUID}'/></source></hostdev>")
    assert devs(xml, host) == [("/dev/vfio/vfio", True)]
    host.mdev(MDEV_UUID, 41)
    assert devs(xml, host) == [("/dev/vfio/41", True), ("/dev/vfio/vfio", True)]


def test_interface_hostdev_and_network_actual_hostdev(host: Host) -> None:
    iface = ("<interface type='hostdev' managed='yes'><source><address type='pci' "
             "domain='0x0000' bus='0x06' slot='0x12' function='0x5'/></source></interface>")
    actual = (f"<interface type='network'><source network='sriov'/><actual type='hostdev'>"
              f"<source>{PCI}</source></actual></interface>")
    for xml in (iface, actual):
        assert devs(xml, host) == [("/dev/vfio/vfio", True)]
    host.pci("0000:06:12.5", 9)
    for xml in (iface, actual):
        assert devs(xml, host) == [("/dev/vfio/9", True), ("/dev/vfio/vfio", True)]


def test_nvme_disk_also_in_a_backing_chain(host: Host) -> None:
    nvme = (f"<disk type='nvme' device='disk'><source type='pci' managed='yes' namespace='1'>"
            f"{PCI}</source><target dev='vda'/></disk>")
    assert devs(nvme, host) == [("/dev/vfio/vfio", True)]
    host.pci("0000:06:12.5", 7)
    assert devs(nvme, host) == [("/dev/vfio/7", True), ("/dev/vfio/vfio", True)]
    chain = (f"<disk type='file'><source file='/var/top.qcow2'/><backingStore type='nvme'>"
             f"<source type='pci' namespace='1'>{PCI}</source></backingStore></disk>")
    assert devs(chain, host) == [("/dev/vfio/7", True), ("/dev/vfio/vfio", True)]


def test_usb_hostdev_by_address_and_by_id(host: Host) -> None:
    by_addr = ("<hostdev mode='subsystem' type='usb'><source>"
               "<address bus='14' device='6'/></source></hostdev>")
    assert devs(by_addr, host) == [("/dev/bus/usb/014/006", True)]
    by_id = ("<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'>"
             "<vendor id='0x1234'/><product id='0xbeef'/></source></hostdev>")
    assert devs(by_id, host) == []
    host.usb("1-2", "1234", "beef", 1, 17)
    host.usb("1-3", "1234", "0001", 1, 18)
    assert devs(by_id, host) == [("/dev/bus/usb/001/017", False)]


def test_scsi_hostdev_sg_node(host: Host) -> None:
    xml = ("<hostdev mode='subsystem' type='scsi'><source><adapter name='scsi_host2'/>"
           "<address bus='0' target='3' unit='1'/></source></hostdev>")
    assert devs(xml, host) == []
    host.scsi("2:0:3:1", "sg4")
    assert devs(xml, host) == [("/dev/sg4", True)]
    iscsi = ("<hostdev mode='subsystem' type='scsi'><source protocol='iscsi' name='iqn.x/1'>"
             "<host name='h'/></source></hostdev>")
    assert devs(iscsi, host) == []


def test_vhost_scsi_and_capabilities_mode(host: Host) -> None:
    assert devs("<hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' "
                "wwpn='naa.5123456789abcde0'/></hostdev>", host) == [("/dev/vhost-scsi", True)]
    assert devs("<hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1"
                "</block></source></hostdev>", host) == []


def test_broken_hostdev_is_refused_alone(host: Host) -> None:
    doc = ("<domain><devices><hostdev mode='subsystem' type='pci'><source>"
           "<address bus='zz'/></source></hostdev>"
           "<disk type='block'><source dev='/dev/sda'/></disk></devices></domain>")
    spec = spec_from_domain_xml(doc, ctx=host.ctx())
    assert [d.path for d in spec.devices] == ["/dev/sda", "/dev/vfio/vfio"]
    assert len(spec.refused) == 1 and "PCI address" in spec.refused[0]


# ------------------------------------------------------------------------ disks
def test_disk_kinds(host: Host) -> None:
    xml = """
      <disk device='disk'><source file='/dev/loop3'/><target dev='vda'/></disk>
      <disk type='dir'><source dir='/dev/fatdir'/><target dev='hda'/></disk>
      <disk type='volume'><source pool='default' volume='v.img'/><target dev='vdb'/></disk>
      <disk type='network'><source protocol='rbd' name='p/i'/><target dev='vdc'/></disk>
      <disk type='block' device='cdrom'><source dev='/dev/sr0' startupPolicy='optional'/>
        <target dev='sda'/></disk>
      <disk type='file' device='cdrom'><target dev='sdb'/></disk>"""
    assert devs(xml, host) == [("/dev/loop3", True), ("/dev/fatdir", True),
                               ("/dev/sr0", False)]
    d = derive_domain_xml(f"<domain><devices>{xml}</devices></domain>")
    assert any("volume default/v.img" in n for n in d.notes)


def test_backing_chain_and_mirror(host: Host) -> None:
    xml = """<disk type='block'><source dev='/dev/vg/top'/>
        <backingStore type='block'><source dev='/dev/vg/mid'/>
          <backingStore type='file'><source file='/var/base.img'/><backingStore/></backingStore>
        </backingStore>
        <mirror type='block' job='copy' ready='yes'><source dev='/dev/vg/copy'/>
          <backingStore type='block'><source dev='/dev/vg/copybase'/></backingStore>
        </mirror>
        <target dev='vda'/></disk>
      <disk type='file'><source file='/var/a.qcow2'/>
        <mirror file='/dev/old-syntax-target' format='raw' job='copy'/>
        <target dev='vdb'/></disk>"""
    assert devs(xml, host) == [("/dev/vg/top", True), ("/dev/vg/mid", True),
                               ("/dev/vg/copy", True), ("/dev/vg/copybase", True),
                               ("/dev/old-syntax-target", True)]


def test_reservations_managed_or_not_need_mapper_control(host: Host) -> None:
    for managed in ("yes", "no"):
        xml = (f"<disk type='block' device='lun'><source dev='/dev/sdc'>"
               f"<reservations managed='{managed}'/></source></disk>")
        assert devs(xml, host) == [("/dev/sdc", True), ("/dev/mapper/control", False)]
    assert devs("<disk type='block'><source dev='/dev/sdc'/></disk>", host) == [
        ("/dev/sdc", True)]


def test_loader_and_nvram(host: Host) -> None:
    doc = """<domain><os><type>hvm</type>
        <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
        <nvram type='block'><source dev='/dev/vg/vars'/></nvram></os></domain>"""
    assert [d.path for d in spec_from_domain_xml(doc, ctx=host.ctx()).devices] == [
        "/dev/vg/vars"]
    doc2 = """<domain><os><loader type='rom'>/dev/mtd0</loader>
        <nvram template='/usr/share/x.fd'>/dev/vg/vars2</nvram></os></domain>"""
    assert [d.path for d in spec_from_domain_xml(doc2, ctx=host.ctx()).devices] == [
        "/dev/mtd0", "/dev/vg/vars2"]


# ----------------------------------------------------------------------- memory
def test_dimm_and_virtio_mem_pagesizes() -> None:
    doc = f"""<domain><memoryBacking><hugepages/></memoryBacking><devices>
      <memory model='dimm'><source><pagesize unit='KiB'>1048576</pagesize></source>
        <target><size unit='KiB'>1048576</size><node>0</node></target></memory>
      <memory model='virtio-mem'><source><pagesize unit='M'>2</pagesize></source>
        <target><size unit='KiB'>2097152</size><node>0</node></target></memory>
      <memory model='dimm'><source><pagesize unit='KiB'>{SYSTEM_PAGE_KIB}</pagesize></source>
        </memory>
      <memory model='dimm'><target><size unit='KiB'>524288</size></target></memory>
    </devices></domain>"""
    d = derive_domain_xml(doc)
    assert d.hugepage_sizes == (0, 1048576, 2048)
    assert [o for _, o in d.hugepages][1].startswith("<memory model='dimm'>")
    # DIMMs alone (no <memoryBacking>) still need their page sizes
    only = doc.replace("<memoryBacking><hugepages/></memoryBacking>", "")
    assert derive_domain_xml(only).hugepage_sizes == (1048576, 2048)


def test_sgx_pmem_nvdimm(host: Host) -> None:
    xml = """<memory model='sgx-epc'><source><nodemask>0</nodemask></source>
        <target><size unit='KiB'>64</size></target></memory>
      <memory model='virtio-pmem' access='shared'><source><path>/dev/pmem0</path></source>
        </memory>"""
    assert devs(xml, host) == [("/dev/sgx_vepc", True), ("/dev/sgx_provision", False),
                               ("/dev/pmem0", True)]


# ------------------------------------------------------------- video, graphics
def test_blob_needs_udmabuf(host: Host) -> None:
    on = "<video><model type='virtio' heads='1' primary='yes' blob='on'/></video>"
    assert devs(on, host) == [("/dev/udmabuf", True)]
    assert devs(on.replace("'on'", "'off'"), host) == []


def test_render_node_from_status_xml_or_host(host: Host) -> None:
    live = "<graphics type='spice'><gl enable='yes' rendernode='/dev/dri/renderD129'/></graphics>"
    assert devs(live, host) == [("/dev/dri/renderD129", True)]
    inactive = "<graphics type='spice'><gl enable='yes'/></graphics>"
    assert devs(inactive, host) == []  # libvirt would pick one; none here
    (host.dev / "dri").mkdir()
    for name in ("renderD129", "renderD128", "card0"):
        (host.dev / "dri" / name).touch()
    assert devs(inactive, host) == [("/dev/dri/renderD128", True)]
    assert devs("<graphics type='egl-headless'><gl/></graphics>", host) == [
        ("/dev/dri/renderD128", True)]
    assert devs("<graphics type='spice'><gl enable='no'/></graphics>", host) == []


# --------------------------------------------------------------- chardevs, TPM
def test_chardev_types(host: Host) -> None:
    xml = """<serial type='file'><source path='/dev/ttyS3'/></serial>
      <serial type='pipe'><source path='/dev/mypipe'/></serial>
      <channel type='unix'><source mode='connect' path='/dev/vsock-like'/></channel>
      <channel type='unix'><source mode='bind' path='/dev/bound'/></channel>
      <console type='pty'><source path='/dev/pts/4'/></console>
      <parallel type='dev'><source path='/dev/parport0'/></parallel>
      <serial type='file'><source path='/var/log/libvirt/qemu/x.log'/></serial>"""
    assert devs(xml, host) == [("/dev/ttyS3", False), ("/dev/mypipe", False),
                               ("/dev/parport0", True), ("/dev/vsock-like", False)]


def test_tpm_passthrough_default_device(host: Host) -> None:
    for backend in ("<backend type='passthrough'><device/></backend>",
                    "<backend type='passthrough'/>"):
        assert devs(f"<tpm model='tpm-tis'>{backend}</tpm>", host) == [("/dev/tpm0", True)]
    assert devs("<tpm><backend type='passthrough'><device path='/dev/tpmrm0'/></backend></tpm>",
                host) == [("/dev/tpmrm0", True)]
    assert devs("<tpm><backend type='emulator'/></tpm>", host) == []


# ------------------------------------------------------------------ qemu.conf
def test_qemu_conf_default_nodes_and_owner(host: Host) -> None:
    conf = LoadedConf("qemu.conf", QemuConf(cgroup_device_acl=(
        "/dev/null", "/dev/kvm", "/dev/rtc", "relative", "/var/x")), True, (), 64055, 994)
    doc = "<domain><name>t</name></domain>"
    spec = spec_from_domain_xml(doc, ctx=host.ctx(conf))
    assert spec.default_devices == ("/dev/null", "/dev/kvm", "/dev/rtc")
    assert (spec.uid, spec.gid) == (64055, 994)
    # the domain's own DAC label wins over qemu.conf
    labelled = ("<domain><seclabel type='dynamic' model='dac' relabel='yes'>"
                "<label>+107:+108</label></seclabel></domain>")
    spec = spec_from_domain_xml(labelled, ctx=host.ctx(conf))
    assert (spec.uid, spec.gid) == (107, 108)
    # no qemu.conf, no label: root and libvirt's default list
    spec = spec_from_domain_xml(doc, ctx=host.ctx())
    assert (spec.uid, spec.gid) == (0, 0) and "/dev/rtc" not in spec.default_devices


def test_dac_label_with_names_resolved_on_the_host(host: Host) -> None:
    doc = ("<domain><seclabel type='static' model='dac'><label>root:root</label></seclabel>"
           "</domain>")
    conf = LoadedConf("qemu.conf", QemuConf(user="+5"), True, (), 5, 5)
    spec = spec_from_domain_xml(doc, ctx=host.ctx(conf))
    assert (spec.uid, spec.gid) == (0, 0)  # root:root by name, not qemu.conf's 5:5


# --------------------------------------------------------------- dm targets
def _blockdev(sysfs: Path, majmin: str, dm: bool, slaves: dict[str, str]) -> None:
    d = sysfs / "dev/block" / majmin
    d.mkdir(parents=True)
    if dm:
        (d / "dm").mkdir()
    (d / "slaves").mkdir()
    for name, mm in slaves.items():
        (d / "slaves" / name).mkdir()
        (d / "slaves" / name / "dev").write_text(mm + "\n")


def test_dm_targets_recursive(host: Host) -> None:
    from nsmount.state import sysfs

    _blockdev(host.sys, "253:1", True, {"dm-0": "253:0", "sdb": "8:16"})
    _blockdev(host.sys, "253:0", True, {"sda": "8:0"})
    _blockdev(host.sys, "8:0", False, {})
    assert sysfs.dm_targets(253, 1, str(host.sys)) == [
        ("dm-0", 253, 0), ("sdb", 8, 16), ("sda", 8, 0)]
    assert sysfs.dm_targets(8, 0, str(host.sys)) == []  # not device-mapper
    assert sysfs.dm_targets(9, 9, str(host.sys)) == []  # absent


def test_dm_targets_become_optional_requests(host: Host, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """hostfacts adds each dm target's node (rdev checked) at build time."""
    from nsmount.engine import hostfacts
    from nsmount.model.devnode import Entry
    from nsmount.model.spec import DeviceRequest

    nodes = {"/dev/dm-1": Entry("/dev/dm-1", "blk", 253, 1),
             "/dev/sda": Entry("/dev/sda", "blk", 8, 0),
             "/dev/sdb": Entry("/dev/sdb", "blk", 8, 99)}  # renumbered: rdev mismatch

    def fake_resolve(path: str, **_: object) -> tuple[Entry, ...]:
        if path not in nodes:
            raise FileNotFoundError(path)
        return (nodes[path],)

    monkeypatch.setattr(hostfacts, "resolve", fake_resolve)
    _blockdev(host.sys, "253:1", True, {"sda": "8:0", "sdb": "8:16"})
    top = hostfacts.Resolved(DeviceRequest("/dev/dm-1"), (nodes["/dev/dm-1"],))
    extra = hostfacts.dm_target_entries([top], root=str(host.sys.parent))
    assert [(r.request.path, r.request.required) for r in extra] == [("/dev/sda", False)]
    assert hostfacts.dm_target_entries(
        [hostfacts.Resolved(DeviceRequest("/dev/sda"), (nodes["/dev/sda"],))],
        root=str(host.sys.parent)) == []
