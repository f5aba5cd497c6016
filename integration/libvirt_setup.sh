#!/bin/sh
# Host preparation for integration/test_libvirt.py (idempotent; changes the machine):
# the Debian libvirt QEMU driver packages (no network config package: test domains
# have no NIC) and the users/groups libvirt resolves before it reads qemu.conf.
# The test itself never touches the host's /etc/libvirt: it overlays a tmpfs there
# inside its own private mount namespace.
set -eu
if [ "$(id -u)" != 0 ]; then
    echo "libvirt_setup.sh: needs root" >&2
    exit 1
fi
need=""
for p in qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' \
        || need="$need $p"
done
if [ -n "$need" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need
fi
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent group kvm >/dev/null || groupadd -r kvm
id -u libvirt-qemu >/dev/null 2>&1 || useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
# empty state dirs: the test overlays a tmpfs on each inside its private namespace,
# so libvirtd never writes to the host's /var
for d in /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /etc/libvirt; do
    [ -d "$d" ] || mkdir -p -m 0755 "$d"
done
command -v libvirtd >/dev/null
command -v virtlogd >/dev/null
command -v virsh >/dev/null
echo "libvirt_setup.sh: ok ($(libvirtd --version))"
