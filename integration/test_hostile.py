"""Hostile VMs: the VM side plants symlinks, bind mounts, FIFOs, sockets, files or
directories where nsmount creates, chmods, chowns, labels or mounts something.

Every case runs in its own sandbox (tests/sandbox.py) with its own stand-in VM(s)
(``nsmount exec --spec F -- sleep 1000``); the cases are functions in
integration/scenarios/hostile.py.  Before anything else the sandbox host gets
a *fake* /etc: a copy of /etc with a fake ``shadow``, bind-mounted over /etc, so a
symlink to /etc/shadow that nsmount wrongly followed would only damage the copy, and
the test would see it.  Each case asserts that nothing changed outside the VM's own
/dev tmpfs / intended mount point: the (fake) /etc tree and the sandbox host's /dev
(inode, type, mode, owner, rdev, content or link target of every entry), any extra
watched tree, and the sandbox host's mountinfo except the mounts the case made on
purpose; that the case is reported (warning / drift / failed action with a reason);
and that the exit code is a documented one (0 clean, 1 repaired, 2 failed, 4 unsafe
path; see nsmount/errors.py).

=====================================  =============================================  =====
case                                   outcome                                        exit
=====================================  =============================================  =====
hugepages_symlink_to_etc_reconnect     /dev/hugepages -> /etc in the VM, hugetlbfs    1
                                       mounted on the host later: warning "points
                                       outside /dev", planted symlink removed, mount
                                       point made on the VM's tmpfs, hugetlbfs
                                       replayed once; rerun 0
node_symlink_to_shadow                 /dev/null -> /etc/shadow: drift "planted",     1
                                       node replaced atomically (rename over the
                                       link); fake shadow untouched
byid_parent_dir_symlink_repair         /dev/disk -> /etc (by-id device): drifts       1
                                       planted + unsafe-path, dir rebuilt, link
                                       recreated; rerun 0
byid_hotplug_parent_dir_symlink        same, via ``device add``: repaired, nothing    0
                                       created in /etc
vfio_dir_symlink_flip_race             /dev/vfio flipped dir <-> symlink to /tmp/x    0/1/2
                                       while repair runs 50x: each run ok, repaired
                                       or failed (ENOENT/ELOOP reason); /tmp/x empty
node_symlink_flip_race                 /dev/null flipped node <-> symlink to shadow   0/1/2
                                       (30 repairs): shadow never chmodded/chowned
hugepage_domain_dir_planted            <hugetlbfs>/libvirt/qemu/3-x planted (symlink  2
                                       refused by the kernel on hugetlbfs -> a bind
                                       mount of /etc): drift missing-hugepage-dir,
                                       action refused "not a directory on the
                                       hugetlbfs"; repair and reconnect fail [fixed]
hugepage_libvirt_component_planted     bind of /etc at <hugetlbfs>/libvirt/qemu:      2
                                       mkdir refused (EXDEV "planted"), /etc/3-x
                                       NOT created  [fixed: was created, 0700]
fifo_at_node                           FIFO at /dev/null: wrong-node, replaced,       1
                                       never opened (no hang)
socket_at_node                         socket at /dev/zero: wrong-node, replaced      1
directory_at_node                      directory at /dev/full: replace fails "Is a    2
                                       directory"; directory content kept
regular_file_at_mount_point            file at /dev/hugepages: "removed planted       1
                                       file", hugetlbfs replayed once
bind_of_etc_at_parent_dir              bind of /etc at /dev/vfio, node below needed:  2
                                       refused "not on the VM's own /dev tmpfs"
bind_of_etc_at_mount_point             bind of /etc at /dev/hugepages: repair shows   2
                                       drift foreign-mount (no stacking, exit 2);
                                       reconnect fails "not a hugetlbfs" (exit 2)
symlink_at_submount                    /dev/shm -> /etc: planted, replaced by a dir,  1
                                       host /dev/shm replayed once; rerun 0
symlink_at_mount_point_parent          /dev/hp -> /etc; hugetlbfs at /dev/hp/2M:      1
                                       parent rebuilt on the VM tmpfs, mount
                                       replayed; rerun 0
dotdot_in_configured_paths             spec devices=["/dev/../etc/passwd"] (exec,     4
                                       repair --spec), mounts with '..': refused
                                       before any change  [fixed: exit was 3]
dotdot_in_hotplug_paths                device add/remove with '..' or relative path   4
hotplug_host_symlink_leaving_dev       host /dev/evil -> /etc/shadow, device add:     4
                                       "resolves to /etc/shadow, outside /dev"
newline_and_space_in_mount_points      tmpfs at "/mnt/a b\\nc", hugetlbfs at           1
                                       "/dev/hp a\\nb": inspect --json shows them
                                       exactly, reconnect replays, rerun 0
huge_dev_listing                       20000 files in /dev/shm, 6000 in /dev/junk:    0
                                       inspect/repair fast, shm not walked
dev_not_a_tmpfs                        VM /dev is a ramfs: drift foreign-dev, nothing 2
                                       written; --rebuild-dev swaps in a tmpfs
                                       (MOVE_MOUNT_BENEATH, not stacked); rerun 0
dev_shared_with_host                   VM /dev is the host's /dev superblock:         2
                                       drift foreign-dev, nothing written  [fixed:
                                       would have written the host /dev]
lock_file_symlink                      lock file -> /etc/shadow: repair refuses       4/2
                                       (ELOOP, exit 4); reconnect fails that VM,
                                       repairs the other  [fixed: whole reconnect
                                       aborted]
record_tmp_symlink                     <pid>.json.tmp.N -> /etc/shadow planted for    0
                                       every N: record written with O_EXCL|
                                       O_NOFOLLOW  [fixed: shadow overwritten]
state_dir_symlink                      /run/nsmount/locks -> /etc: refused (ELOOP),   4
                                       no lock file in /etc  [fixed]
=====================================  =============================================  =====
"""

from __future__ import annotations

import pytest
from harness import in_sandbox, privileged
from scenarios import hostile

pytestmark = privileged


@pytest.mark.parametrize("name", sorted(hostile.CASES))
def test_hostile(name: str) -> None:
    _, hugetlbfs = hostile.CASES[name]
    res = in_sandbox(hostile.run_case, name, hugetlbfs=hugetlbfs, check=False, timeout=150)
    assert res.returncode == 0, res.describe()
    assert res.json()["problems"] == [], res.describe()


def test_case_count() -> None:
    assert len(hostile.CASES) >= 20
