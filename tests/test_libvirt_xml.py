"""VmSpec from libvirt domain XML and status XML."""

from __future__ import annotations

import pytest

from nsmount.errors import SpecError
from nsmount.model.libvirt_xml import spec_from_domain_xml, spec_from_status_xml
from nsmount.model.spec import DeviceRequest

# A running domain as libvirt 9.x dumps it (virsh dumpxml), trimmed of noise.
DOMAIN = """<domain type='kvm' id='5' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>db-primary</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>8388608</memory>
  <currentMemory unit='KiB'>8388608</currentMemory>
  <memoryBacking>
    <hugepages>
      <page size='1' unit='G' nodeset='0'/>
      <page size='2048' unit='KiB' nodeset='1'/>
    </hugepages>
  </memoryBacking>
  <vcpu placement='static'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source dev='/dev/loop0' index='3'/>
      <backingStore type='block' index='4'>
        <format type='qcow2'/>
        <source dev='/dev/loop1'/>
        <backingStore type='file' index='5'>
          <format type='raw'/>
          <source file='/dev/mapper/base-img'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/data.qcow2' index='2'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='nbd' name='exp'><host name='nbd.example' port='10809'/></source>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <interface type='bridge'>
      <mac address='52:54:00:6b:3c:58'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <interface type='user'>
      <model type='e1000e'/>
    </interface>
    <serial type='dev'>
      <source path='/dev/ttyS1'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
      <alias name='serial0'/>
    </serial>
    <console type='dev'>
      <source path='/dev/ttyS1'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/5-db-primary/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <input type='evdev'>
      <source dev='/dev/input/by-id/usb-kbd-event-kbd' grab='all' repeat='on'/>
    </input>
    <input type='mouse' bus='ps2'/>
    <tpm model='tpm-crb'>
      <backend type='passthrough'>
        <device path='/dev/tpm0'/>
      </backend>
    </tpm>
    <graphics type='spice' autoport='yes'>
      <listen type='none'/>
      <gl enable='yes' rendernode='/dev/dri/renderD128'/>
    </graphics>
    <sound model='ich9'/>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source>
        <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
      </source>
      <alias name='hostdev0'/>
    </hostdev>
    <hostdev mode='subsystem' type='scsi' managed='no'>
      <source><adapter name='scsi_host2'/><address bus='0' target='0' unit='0'/></source>
    </hostdev>
    <memballoon model='virtio'/>
    <rng model='virtio'>
      <backend model='random'>/dev/hwrng</backend>
    </rng>
  </devices>
  <launchSecurity type='sev'>
    <cbitpos>47</cbitpos>
    <reducedPhysBits>1</reducedPhysBits>
    <policy>0x0003</policy>
  </launchSecurity>
  <seclabel type='dynamic' model='selinux' relabel='yes'>
    <label>system_u:system_r:svirt_t:s0:c392,c662</label>
    <imagelabel>system_u:object_r:svirt_image_t:s0:c392,c662</imagelabel>
  </seclabel>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+107:+107</label>
    <imagelabel>+107:+107</imagelabel>
  </seclabel>
  <qemu:commandline>
    <qemu:arg value='-object'/>
    <qemu:arg value='input-linux,id=kbd2,evdev=/dev/input/event7'/>
  </qemu:commandline>
</domain>
"""

EXPECTED = [
    ("/dev/loop0", True), ("/dev/loop1", True), ("/dev/mapper/base-img", True),
    ("/dev/vfio/vfio", True), ("/dev/tpm0", True), ("/dev/hwrng", True),
    ("/dev/ttyS1", True), ("/dev/net/tun", False), ("/dev/vhost-net", False),
    ("/dev/input/by-id/usb-kbd-event-kbd", True), ("/dev/dri/renderD128", True),
    ("/dev/sev", True), ("/dev/input/event7", True),
]

STATUS = f"""<domstatus state='running' reason='booted' pid='48213'>
  <taint flag='high-privileges'/>
  <monitor path='/var/lib/libvirt/qemu/domain-5-db-primary/monitor.sock' type='unix'/>
  <vcpus>
    <vcpu id='0' pid='48240'/>
  </vcpus>
  <qemuCaps><flag name='kvm'/></qemuCaps>
  <devices><device alias='virtio-disk0'/></devices>
  <libDir path='/var/lib/libvirt/qemu/domain-5-db-primary'/>
  <channelTargetDir path='/var/lib/libvirt/qemu/channel/target/domain-5-db-primary'/>
  {DOMAIN}
</domstatus>
"""


def _devs(xml: str) -> list[tuple[str, bool]]:
    return [(d.path, d.required) for d in spec_from_domain_xml(xml).devices]


def test_full_domain() -> None:
    spec = spec_from_domain_xml(DOMAIN)
    assert spec.name == "db-primary"
    assert spec.domain_id == 5
    assert spec.uuid == "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
    assert sorted((d.path, d.required) for d in spec.devices) == sorted(EXPECTED)
    assert spec.hugepages == (1048576, 2048)
    assert (spec.uid, spec.gid) == (107, 107)
    assert spec.source == "domain-xml"
    # a disk image outside /dev and the emulator are not device requests
    assert not any(d.path.startswith("/var") or d.path.startswith("/usr") for d in spec.devices)


def test_status_xml() -> None:
    pid, spec = spec_from_status_xml(STATUS)
    assert pid == 48213
    assert spec.source == "libvirt-status"
    assert spec.domain_id == 5 and spec.name == "db-primary"
    assert sorted((d.path, d.required) for d in spec.devices) == sorted(EXPECTED)
    # a status file given as --domain-xml means its domain
    assert spec_from_domain_xml(STATUS).name == "db-primary"


def test_inactive_domain_has_no_id_and_default_owner() -> None:
    spec = spec_from_domain_xml("<domain type='kvm' id='-1'><name>x</name></domain>")
    assert spec.domain_id is None and (spec.uid, spec.gid) == (0, 0)
    assert spec_from_domain_xml("<domain type='kvm'><name>x</name></domain>").domain_id is None
    assert spec.hugepages == () and spec.devices == ()


def test_xml_declaration_accepted() -> None:
    xml = "<?xml version='1.0' encoding='UTF-8'?>\n<domain><name>é</name></domain>"
    assert spec_from_domain_xml(xml).name == "é"


@pytest.mark.parametrize(("body", "expected"), [
    ("<hugepages/>", (0,)),
    ("<hugepages><page size='2' unit='M'/></hugepages>", (2048,)),
    ("<hugepages><page size='2' unit='MiB'/><page size='2048'/></hugepages>", (2048,)),
    ("<hugepages><page size='1' unit='g'/></hugepages>", (1048576,)),
    ("<hugepages><page size='2097152' unit='b'/></hugepages>", (2048,)),
    ("<hugepages><page size='2097152' unit='bytes'/></hugepages>", (2048,)),
    ("<hugepages><page size='2048' unit='k'/></hugepages>", (2048,)),
    ("<hugepages><page size='1' unit='T'/></hugepages>", (1 << 30,)),
    ("<hugepages><page size='1' unit='GB'/></hugepages>", (976563,)),  # rounded up
    ("<source type='file'/>", ()),
])
def test_hugepage_units(body: str, expected: tuple[int, ...]) -> None:
    xml = f"<domain><name>x</name><memoryBacking>{body}</memoryBacking></domain>"
    assert spec_from_domain_xml(xml).hugepages == expected


@pytest.mark.parametrize("page", [
    "<page unit='G'/>", "<page size='0'/>", "<page size='-1'/>", "<page size='2' unit='Q'/>",
    "<page size='1_0'/>", "<page size='99999999999999999999' unit='E'/>",
])
def test_bad_hugepages(page: str) -> None:
    xml = f"<domain><memoryBacking><hugepages>{page}</hugepages></memoryBacking></domain>"
    with pytest.raises(SpecError):
        spec_from_domain_xml(xml)


def test_vhost_rules() -> None:
    def nic(inner: str, kind: str = "network") -> str:
        return f"<domain><devices><interface type='{kind}'>{inner}</interface></devices></domain>"

    tun, vhost = ("/dev/net/tun", False), ("/dev/vhost-net", False)
    assert _devs(nic("<model type='virtio'/>")) == [tun, vhost]
    assert _devs(nic("<model type='virtio'/><driver name='qemu'/>")) == [tun]
    assert _devs(nic("<model type='e1000e'/><driver name='vhost'/>", "ethernet")) == [tun, vhost]
    assert _devs(nic("<model type='rtl8139'/>", "bridge")) == [tun]
    assert _devs(nic("<model type='virtio'/>", "user")) == []
    assert _devs(nic("<source><address type='pci'/></source>", "hostdev")) == [
        ("/dev/vfio/vfio", True)]


def test_misc_devices() -> None:
    xml = """<domain><devices>
      <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
        <source><address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/></source></hostdev>
      <hostdev mode='subsystem' type='scsi_host'><source protocol='vhost' wwpn='naa.5'/></hostdev>
      <disk type='nvme' device='disk'><source type='pci' managed='yes' namespace='1'>
        <address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></disk>
      <disk type='block'><source dev='/dev/sdx'><reservations managed='yes'/></source></disk>
      <parallel type='dev'><source path='/dev/parport0'/></parallel>
      <channel type='pty'><target type='virtio' name='x'/></channel>
      <rng model='virtio'>
        <backend model='egd' type='dev'><source path='/dev/hwrng2'/></backend></rng>
      <rng model='virtio'><backend model='random'/></rng>
      <rng model='virtio'><backend model='builtin'/></rng>
      <input type='passthrough' bus='virtio'><source evdev='/dev/input/event3'/></input>
      <tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>
      <tpm model='tpm-tis'><backend type='passthrough'/></tpm>
      <memory model='nvdimm'><source><path>/dev/dax0.0</path></source></memory>
      <memory model='sgx-epc'><target><size unit='KiB'>16384</size></target></memory>
      <video><model type='virtio'>
        <acceleration accel3d='yes' rendernode='/dev/dri/renderD129'/></model></video>
      <graphics type='egl-headless'><gl rendernode='/dev/dri/renderD128'/></graphics>
      <serial type='dev'><source path='/dev//ttyS0/'/></serial>
    </devices><launchSecurity type='sev-snp'/></domain>"""
    # the pure parser leaves host lookups (VFIO groups) out; see test_libvirt_devices
    assert _devs(xml) == [
        ("/dev/vfio/vfio", True), ("/dev/sdx", True), ("/dev/mapper/control", False),
        ("/dev/vhost-scsi", True), ("/dev/dax0.0", True), ("/dev/sgx_vepc", True),
        ("/dev/sgx_provision", False), ("/dev/ttyS0", True), ("/dev/parport0", True),
        ("/dev/tpm0", True), ("/dev/dri/renderD128", True), ("/dev/dri/renderD129", True),
        ("/dev/input/event3", True), ("/dev/hwrng2", True), ("/dev/sev", True),
    ]


def test_required_wins_over_optional_duplicate() -> None:
    xml = """<domain><devices>
      <interface type='network'><model type='virtio'/></interface>
      <serial type='dev'><source path='/dev/net/tun'/></serial>
    </devices></domain>"""
    spec = spec_from_domain_xml(xml)
    assert spec.devices[0] == DeviceRequest("/dev/net/tun", True)


@pytest.mark.parametrize("label,expected", [
    ("<label>+107:+107</label>", (107, 107)),
    ("<imagelabel>+64055:+108</imagelabel>", (64055, 108)),
    ("<label>qemu:kvm</label>", (0, 0)),  # names need the host's passwd: not resolved
    ("<label>+1:</label>", (0, 0)),
])
def test_dac_label(label: str, expected: tuple[int, int]) -> None:
    xml = f"<domain><seclabel type='dynamic' model='dac'>{label}</seclabel></domain>"
    spec = spec_from_domain_xml(xml)
    assert (spec.uid, spec.gid) == expected


def test_selinux_or_none_seclabel_ignored() -> None:
    xml = ("<domain><seclabel type='none' model='dac'><label>+5:+5</label></seclabel>"
           "<seclabel type='dynamic' model='selinux'><label>+6:+6</label></seclabel></domain>")
    spec = spec_from_domain_xml(xml)
    assert (spec.uid, spec.gid) == (0, 0)


BAD = [
    "",
    "<domain>",
    "<domain><name>x</name></domian>",
    "not xml at all",
    "<vm><name>x</name></vm>",
    "<domain id='five'/>",
    "<domain id='-2'/>",
    "<domain><name>&undefined;</name></domain>",
    """<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>
       <domain><name>&lol2;</name></domain>""",
    "<!doctype domain><domain/>",
    "<domain>\ud800</domain>",
    "<domain><memoryBacking><hugepages/></memoryBacking><devices><memory model='dimm'>"
    "<source><pagesize unit='KiB'>lots</pagesize></source></memory></devices></domain>",
]


@pytest.mark.parametrize("xml", BAD)
def test_bad_domain_xml(xml: str) -> None:
    with pytest.raises(SpecError) as info:
        spec_from_domain_xml(xml)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("xml", "refused"), [
    # '..' and relative paths outside /dev: libvirt accepts them, so do we (quietly)
    ("<disk type='block'><source dev='/dev/../etc/shadow'/></disk>", 0),
    ("<disk type='block'><source dev='dev/sda'/></disk>", 0),
    ("<disk><source file='disk.img'/></disk>", 0),
    ("<disk type='file'><source file='/var/lib/libvirt/images/../img/a.qcow2'/></disk>", 0),
    ("<serial type='dev'><source path='ttyS0'/></serial>", 0),
    ("<tpm><backend type='passthrough'><device path='/dev/../tpm0'/></backend></tpm>", 0),
    # reaching /dev through '..': that device is refused and reported, nothing else
    ("<disk type='file'><source file='/var/img.qcow2'/><backingStore type='file'>"
     "<source file='/var/lib/../../dev/sda'/></backingStore></disk>", 1),
    ("<disk type='block'><source dev='/dev/mapper/../sda'/></disk>", 1),
    ("<serial type='dev'><source path='/tmp/../dev/ttyS0'/></serial>", 1),
])
def test_dotdot_and_relative_paths(xml: str, refused: int) -> None:
    doc = (f"<domain><devices>{xml}<disk type='block'><source dev='/dev/sdz'/></disk>"
           "</devices></domain>")
    spec = spec_from_domain_xml(doc)
    assert [d.path for d in spec.devices] == ["/dev/sdz"]  # the rest of the domain stays
    assert len(spec.refused) == refused
    assert all("\n" not in r and "'..'" in r for r in spec.refused)


def test_doctype_text_inside_cdata_is_fine() -> None:
    xml = ("<domain><name>x</name><description><![CDATA[<!DOCTYPE x [<!ENTITY a 'b'>]>]]>"
           "</description><devices><disk type='block'><source dev='/dev/sda'/></disk>"
           "</devices></domain>")
    assert [d.path for d in spec_from_domain_xml(xml).devices] == ["/dev/sda"]


@pytest.mark.parametrize("xml", [
    "<domain id='1'><name>x</name></domain>",  # not a status document
    "<domstatus state='running'><domain/></domstatus>",  # no pid
    "<domstatus pid='0'><domain/></domstatus>",
    "<domstatus pid='12x'><domain/></domstatus>",
    "<domstatus pid='12'></domstatus>",
    "<domstatus pid='12'><domain/><domain/></domstatus>",
])
def test_bad_status_xml(xml: str) -> None:
    with pytest.raises(SpecError):
        spec_from_status_xml(xml)


def test_deep_backing_chain_is_not_recursive() -> None:
    depth = 3000
    chain = "".join(f"<backingStore type='block'><source dev='/dev/loop{i}'/>"
                    for i in range(depth)) + "</backingStore>" * depth
    xml = f"<domain><devices><disk type='block'>{chain}</disk></devices></domain>"
    assert len(spec_from_domain_xml(xml).devices) == depth
