"""VmSpec from QEMU command lines (argv and raw /proc/PID/cmdline)."""

from __future__ import annotations

import pytest

from nsmount.errors import SpecError
from nsmount.model.qemu_cmdline import spec_from_cmdline, spec_from_proc_cmdline, split_opts

# What libvirt 9.x runs for a q35 guest with hugepage-backed RAM, a qcow2 overlay on
# /dev/loop0 over /dev/loop1, a tap NIC with vhost, a host serial port, TPM
# passthrough (via fdset) and a VFIO hostdev (from `ps -o args` of a real run).
LIBVIRT_ARGV = [
    "/usr/bin/qemu-system-x86_64",
    "-name", "guest=db-primary,debug-threads=on",
    "-S",
    "-object", '{"qom-type":"secret","id":"masterKey0","format":"raw",'
               '"file":"/var/lib/libvirt/qemu/domain-5-db-primary/master-key.aes"}',
    "-machine", "pc-q35-8.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram,"
                "hpet=off,acpi=on",
    "-accel", "kvm",
    "-cpu", "host,migratable=on",
    "-m", "size=8388608k",
    "-object", '{"qom-type":"memory-backend-file","id":"pc.ram",'
               '"mem-path":"/dev/hugepages/libvirt/qemu/5-db-primary",'
               '"x-use-canonical-path-for-ramblock-id":false,"prealloc":true,'
               '"size":8589934592}',
    "-overcommit", "mem-lock=off",
    "-smp", "4,sockets=4,cores=1,threads=1",
    "-uuid", "4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
    "-no-user-config", "-nodefaults",
    "-chardev", "socket,id=charmonitor,fd=30,server=on,wait=off",
    "-mon", "chardev=charmonitor,id=monitor,mode=control",
    "-rtc", "base=utc,driftfix=slew",
    "-global", "kvm-pit.lost_tick_policy=delay",
    "-no-shutdown",
    "-boot", "strict=on",
    "-device", '{"driver":"pcie-root-port","port":16,"chassis":1,"id":"pci.1",'
               '"bus":"pcie.0","multifunction":true,"addr":"0x2"}',
    "-blockdev", '{"driver":"host_device","filename":"/dev/loop1",'
                 '"node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap"}',
    "-blockdev", '{"node-name":"libvirt-2-format","read-only":true,"driver":"qcow2",'
                 '"file":"libvirt-2-storage"}',
    "-blockdev", '{"driver":"host_device","filename":"/dev/loop0",'
                 '"node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}',
    "-blockdev", '{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2",'
                 '"file":"libvirt-1-storage","backing":"libvirt-2-format"}',
    "-device", '{"driver":"virtio-blk-pci","bus":"pci.4","addr":"0x0",'
               '"drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}',
    "-blockdev", '{"driver":"file","filename":"/var/lib/libvirt/images/data.qcow2",'
                 '"node-name":"libvirt-3-storage"}',
    "-netdev", '{"type":"tap","fd":"32","vhost":true,"vhostfd":"34","id":"hostnet0"}',
    "-device", '{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0",'
               '"mac":"52:54:00:6b:3c:58","bus":"pci.1","addr":"0x0"}',
    "-chardev", "tty,id=charserial0,path=/dev/ttyS1",
    "-device", '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}',
    "-add-fd", "set=0,fd=35,opaque=/dev/tpm0",
    "-tpmdev", "passthrough,id=tpm-tpm0,path=/dev/fdset/0,cancel-path=/dev/fdset/1",
    "-device", '{"driver":"tpm-crb","tpmdev":"tpm-tpm0","id":"tpm0"}',
    "-device", '{"driver":"vfio-pci","host":"0000:03:00.0","id":"hostdev0",'
               '"bus":"pci.5","addr":"0x0"}',
    "-object", '{"qom-type":"rng-random","id":"objrng0","filename":"/dev/hwrng"}',
    "-device", '{"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0","bus":"pci.6"}',
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    "-msg", "timestamp=on",
]


def test_libvirt_generated_cmdline() -> None:
    spec = spec_from_cmdline(LIBVIRT_ARGV)
    assert spec.name == "db-primary"
    assert spec.uuid == "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
    assert spec.domain_id is None
    assert [(d.path, d.required) for d in spec.devices] == [
        ("/dev/loop1", True), ("/dev/loop0", True), ("/dev/net/tun", False),
        ("/dev/vhost-net", False), ("/dev/ttyS1", True), ("/dev/vfio/vfio", True),
        ("/dev/hwrng", True),
    ]
    assert spec.memory_paths == ("/dev/hugepages/libvirt/qemu/5-db-primary",)
    assert spec.hugepages == (0,)
    assert spec.source == "cmdline"


def test_proc_cmdline_round_trip() -> None:
    raw = b"\0".join(a.encode() for a in LIBVIRT_ARGV) + b"\0"
    assert spec_from_proc_cmdline(raw) == spec_from_cmdline(LIBVIRT_ARGV)


def test_hand_written_cmdline_keyval() -> None:
    argv = [
        "qemu-system-x86_64", "-enable-kvm", "-name", "web,,1", "-m", "2G",
        "-mem-path", "/dev/hugepages1G/web", "-mem-prealloc",
        "-drive", "file=/dev/disk/by-id/wwn-0x5000,,c500,format=raw,if=virtio",
        "-drive", "if=none,id=d2,file.driver=host_device,file.filename=/dev/sdc",
        "-drive", "file=disk.qcow2,if=virtio",
        "-drive", "file=nbd://nbd.example/exp,if=virtio",
        "-blockdev", "driver=host_device,node-name=n1,filename=/dev/nvme0n1",
        "--netdev", "tap,id=n0,ifname=tap0,script=no,vhost=on",
        "-netdev", "tap,id=n1,ifname=tap1,script=no",
        "-device", "vfio-pci,host=0000:01:00.0",
        "-chardev", "serial,id=s0,path=/dev/ttyUSB0",
        "-chardev", "file,id=log,path=/dev/shm/console.log",
        "-object", "rng-random,id=rng0,filename=/dev/hwrng",
        "-tpmdev", "passthrough,id=tpm0",
        "-object", "memory-backend-memfd,id=m1,hugetlb=on,hugetlbsize=2M,size=1G",
        "-object", "input-linux,id=kbd,evdev=/dev/input/event2,grab_all=on",
        "-display", "egl-headless,rendernode=/dev/dri/renderD128",
        "-serial", "/dev/ttyS3",
        "-append", "-drive file=/dev/sdz",  # kernel command line, not an option
    ]
    spec = spec_from_cmdline(argv)
    assert spec.name == "web,1"
    assert [(d.path, d.required) for d in spec.devices] == [
        ("/dev/disk/by-id/wwn-0x5000,c500", True), ("/dev/sdc", True),
        ("/dev/nvme0n1", True), ("/dev/net/tun", False), ("/dev/vhost-net", False),
        ("/dev/vfio/vfio", True), ("/dev/ttyUSB0", True), ("/dev/hwrng", True),
        ("/dev/tpm0", True), ("/dev/input/event2", True), ("/dev/dri/renderD128", True),
        ("/dev/ttyS3", True),
    ]
    assert spec.memory_paths == ("/dev/hugepages1G/web",)
    assert spec.hugepages == (0, 2048)


def test_drive_json_pseudo_protocol() -> None:
    value = ('file=json:{"driver":"qcow2",,"file":{"driver":"host_device",,'
             '"filename":"/dev/sdd"}},if=virtio')
    spec = spec_from_cmdline(["qemu", "-drive", value])
    assert [d.path for d in spec.devices] == ["/dev/sdd"]


def test_shm_and_libvirt_ram_dir_are_not_hugepages() -> None:
    spec = spec_from_cmdline(["qemu", "-object",
                              "memory-backend-file,id=m,mem-path=/dev/shm/vm,share=on",
                              "-object", '{"qom-type":"memory-backend-file","id":"m2",'
                              '"mem-path":"/var/lib/libvirt/qemu/ram/5-x/ram-node0"}'])
    assert spec.hugepages == ()
    assert spec.memory_paths == ("/dev/shm/vm", "/var/lib/libvirt/qemu/ram/5-x/ram-node0")


def test_name_forms() -> None:
    assert spec_from_cmdline(["qemu", "-name", "foo"]).name == "foo"
    assert spec_from_cmdline(["qemu", "-name", "guest=5-foo,process=q"]).name == "5-foo"
    assert spec_from_cmdline(["qemu", "-name", "{x}"]).name == "{x}"  # -name takes no JSON
    assert spec_from_cmdline(["qemu"]).name is None


def test_trailing_unknown_flag_is_harmless() -> None:
    assert spec_from_cmdline(["qemu", "-uuid", "u", "-some-new-flag"]).uuid == "u"


def test_split_opts() -> None:
    assert split_opts("tty,id=c,path=/dev/a,,b,,,flag,,") == [
        (None, "tty"), ("id", "c"), ("path", "/dev/a,b,"), ("flag,", "on")]
    assert split_opts("a=b=c") == [("a", "b=c")]
    assert split_opts("") == []


@pytest.mark.parametrize("argv", [
    [],
    ["qemu", "-drive"],  # option without its argument
    ["qemu", "-blockdev", '{"driver":"host_device","filename":'],
    ["qemu", "-blockdev", "{garbage"],
    ["qemu", "-device", '{"driver":"vfio-pci"}}'],
    ["qemu", "-object", "[1, 2]"],  # keyval, not JSON: fine... see below
    ["qemu", "-netdev", '{"type":"tap","vhost":' + "[" * 100000 + "]" * 100000 + "}"],
    ["qemu", "-drive", "file=json:{not json}"],
    ["qemu", "-object", "memory-backend-memfd,id=m,hugetlb=on,hugetlbsize=lots"],
    "qemu -drive file=/dev/sda",  # a string, not a list
])
def test_bad_cmdline(argv: list[str]) -> None:
    if argv == ["qemu", "-object", "[1, 2]"]:
        assert spec_from_cmdline(argv).devices == ()
        return
    with pytest.raises(SpecError) as info:
        spec_from_cmdline(argv)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [
    '{"driver": [], "file": null}',  # found by the fuzz profile: unhashable selector
    '{"driver": {"x": 1}}', '{"driver": 7}',
])
def test_non_string_json_selectors_are_ignored(value: str) -> None:
    for opt in ("-device", "-object", "-netdev", "-blockdev"):
        assert spec_from_cmdline(["qemu", opt, value]).devices == ()


def test_dotdot_outside_dev_is_fine_into_dev_is_refused_alone() -> None:
    # libvirt and QEMU accept '..': outside /dev it is quietly not ours
    blockdev = '{"driver":"host_device","filename":"/dev/sda/../../root"}'
    spec = spec_from_cmdline(["qemu", "-drive", "file=/dev/../etc/shadow", "-blockdev", blockdev,
                              "-drive", "file=/var/lib/../img/a.qcow2,if=none"])
    assert spec.devices == () and spec.refused == ()
    # a path reaching /dev through '..' is refused for that option only
    spec = spec_from_cmdline(["qemu", "-drive", "file=/var/../dev/sda",
                              "-drive", "file=/dev/sdb", "-chardev", "tty,id=c,path=/dev/\0x"])
    assert [d.path for d in spec.devices] == ["/dev/sdb"]
    assert len(spec.refused) == 2 and "/var/../dev/sda" in spec.refused[0]
    assert "NUL" in spec.refused[1]


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe-drive\0", "qemu\0".encode("utf-16")])
def test_bad_proc_cmdline(raw: bytes) -> None:
    with pytest.raises(SpecError):
        spec_from_proc_cmdline(raw)


def test_proc_cmdline_keeps_empty_arguments() -> None:
    spec = spec_from_proc_cmdline(b"qemu\0-name\0\0-uuid\0u-1\0")
    assert spec.name is None and spec.uuid == "u-1"
