/* The floors of a reconnect, in one process, for bench/bench_floor.py (compiled at bench
 * run time with cc -O2):
 *
 *   floor_reconnect MOUNTPOINT < VMS                  the plain floor
 *   floor_reconnect reset MOUNTPOINT < VMS            undo it (the next run works again)
 *   floor_reconnect checked MOUNTPOINT LOCKDIR < VMS  the checked floor
 *
 * VMS: one "PID DOMAIN_ID NAME" line per VM.  Each mode prints one JSON line: {"vms",
 * "failed", "loop_ns"} (loop_ns: the loop alone, without process start-up and reading
 * stdin).
 *
 * The plain floor is the least work that makes a hugetlbfs (and a per-domain directory)
 * visible inside N running VMs, no checks: per VM pidfd_open, setns(pidfd, CLONE_NEWNS),
 * mkdir MOUNTPOINT, mount -t hugetlbfs -o pagesize=2M, mkdir -p
 * MOUNTPOINT/libvirt/qemu/ID-NAME.  "reset" detaches MOUNTPOINT in every VM instead.
 *
 * The checked floor makes the syscalls nsmount's per-VM pipeline makes for a VM that
 * needs its hugetlbfs replayed (strace of a worker, see bench/README.md), in the same
 * order -- and nothing else: no mountinfo parsing, no planning, no Python.  What the
 * trust model's checks cost the kernel.  Per VM:
 *   pin       pidfd_open; read /proc/PID/stat; open /proc/PID/ns/mnt; poll the pidfd;
 *             fstat the ns; NS_GET_USERNS + fstat (its owner)
 *   lock      open LOCKDIR, openat the VM's lock file, flock
 *   table     read /proc/PID/mountinfo (open, fstat, read to the end); poll; stat the
 *             ns path again (still the pinned one)
 *   host look openat2 MOUNTPOINT and the per-domain dir beneath it (absent)
 *   VM look   setns(ns); openat2 dev; fstatfs, fstat, statx; fstatat of 11 entries;
 *             openat2 MOUNTPOINT; fstat, statx; openat2 the per-domain dir; setns back
 *   host dirs openat2 MOUNTPOINT, fstatfs; walk libvirt, qemu with openat2
 *             (RESOLVE_NO_XDEV), mkdirat ID-NAME, openat2 it, fchownat, fchmodat2
 *   clone     openat2 MOUNTPOINT, statx, open_tree(CLONE|RECURSIVE),
 *             mount_setattr(MS_SLAVE)
 *   VM apply  poll; setns(ns); openat2 MOUNTPOINT; fstat x2; statx; move_mount; openat2
 *             MOUNTPOINT again, fstatfs, openat2 the per-domain dir, fstat; setns back
 *   done      close everything; stat /proc/thread-self/ns/mnt (the worker is home)
 * Every lookup uses openat2(RESOLVE_BENEATH|NO_SYMLINKS|NO_MAGICLINKS) from a root fd,
 * as nsmount does.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_fchmodat2
#define SYS_fchmodat2 452
#endif
#define NS_GET_USERNS_ 0xb701
#define RESOLVE_NO_XDEV_ 0x01
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_NO_SYMLINKS_ 0x04
#define RESOLVE_BENEATH_ 0x08
#define SAFE (RESOLVE_BENEATH_ | RESOLVE_NO_SYMLINKS_ | RESOLVE_NO_MAGICLINKS_)
#define OPEN_TREE_CLONE_ 1
#define MOVE_MOUNT_F_EMPTY_PATH_ 0x04
#define MOVE_MOUNT_T_EMPTY_PATH_ 0x40
#define MOUNT_ATTR_SIZE_VER0_ 32

#define MAX_VMS 100000

struct open_how_ { uint64_t flags, mode, resolve; };
struct mount_attr_ { uint64_t attr_set, attr_clr, propagation, userns_fd; };
struct vm { int pid; int id; char name[64]; };


static int mkdir_ok(const char *p)
{
    return mkdir(p, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

static int one(const struct vm *v, const char *mp, int reset)
{
    char path[4096];
    int fd = (int)syscall(SYS_pidfd_open, v->pid, 0);
    int rc = -1;

    if (fd < 0)
        return -1;
    if (setns(fd, CLONE_NEWNS) != 0)
        goto out;
    if (reset) {
        rc = umount2(mp, MNT_DETACH) == 0 || errno == EINVAL ? 0 : -1;
        goto out;
    }
    if (mkdir_ok(mp) != 0)
        goto out;
    if (mount("nodev", mp, "hugetlbfs", 0, "pagesize=2M") != 0)
        goto out;
    snprintf(path, sizeof path, "%s/libvirt", mp);
    if (mkdir_ok(path) != 0)
        goto out;
    snprintf(path, sizeof path, "%s/libvirt/qemu", mp);
    if (mkdir_ok(path) != 0)
        goto out;
    snprintf(path, sizeof path, "%s/libvirt/qemu/%d-%s", mp, v->id, v->name);
    rc = mkdir_ok(path);
out:
    close(fd);
    return rc;
}

static const char *ENTRIES[] = {"null", "full", "zero", "random", "urandom", "ptmx", "kvm",
                                "pts", "shm", "mqueue", "hugepages"};

static int oat2(int dfd, const char *path, uint64_t flags, uint64_t resolve)
{
    struct open_how_ how = {flags | O_CLOEXEC, 0, resolve};
    return (int)syscall(SYS_openat2, dfd, path, &how, sizeof how);
}

static int dir_path(int dfd, const char *path, uint64_t resolve)
{
    return oat2(dfd, path, O_PATH | O_DIRECTORY | O_NOFOLLOW, resolve);
}

static void statx_mnt(int fd)
{
    struct statx sx;
    statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, STATX_MNT_ID, &sx);
}

static int alive(int pidfd)
{
    struct pollfd p = {pidfd, POLLIN, 0};
    return poll(&p, 1, 0) == 0;
}

static void read_all(const char *path, int flags)
{
    char buf[65536];
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC | flags);
    if (fd < 0)
        return;
    if (flags)
        fstat(fd, &st);
    while (read(fd, buf, sizeof buf) > 0)
        ;
    close(fd);
}

static int checked(const struct vm *v, const char *mp, const char *lockdir, int host)
{
    char path[4096], dom[128], rel[256];
    struct stat st;
    struct statfs sf;
    int rc = -1, pidfd, ns, owner, ldir, lock, root, dev, hp, d, q, l, clone;
    struct mount_attr_ attr = {0, 0, MS_SLAVE, 0};

    snprintf(dom, sizeof dom, "%d-%s", v->id, v->name);
    snprintf(rel, sizeof rel, "libvirt/qemu/%s", dom);
    /* pin */
    pidfd = (int)syscall(SYS_pidfd_open, v->pid, 0);
    if (pidfd < 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/stat", v->pid);
    read_all(path, 0);
    snprintf(path, sizeof path, "/proc/%d/ns/mnt", v->pid);
    ns = open(path, O_RDONLY | O_CLOEXEC);
    alive(pidfd);
    fstat(ns, &st);
    owner = ioctl(ns, NS_GET_USERNS_);
    fstat(owner, &st);
    close(owner);
    /* lock */
    ldir = open(lockdir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    snprintf(path, sizeof path, "%d.lock", v->pid);
    lock = openat(ldir, path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    close(ldir);
    flock(lock, LOCK_EX | LOCK_NB);
    alive(pidfd);
    /* the VM's mount table, from the host side, then re-checked */
    snprintf(path, sizeof path, "/proc/%d/mountinfo", v->pid);
    read_all(path, O_NONBLOCK | O_NOFOLLOW | O_NOCTTY);
    alive(pidfd);
    snprintf(path, sizeof path, "/proc/%d/ns/mnt", v->pid);
    stat(path, &st);
    /* host look */
    root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    hp = dir_path(root, mp + 1, SAFE);
    d = dir_path(hp, rel, SAFE | RESOLVE_NO_XDEV_);
    if (d >= 0)
        close(d);
    close(hp);
    close(root);
    /* VM look */
    if (setns(ns, CLONE_NEWNS) != 0)
        goto out;
    root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    dev = dir_path(root, "dev", SAFE);
    fstatfs(dev, &sf);
    fstat(dev, &st);
    statx_mnt(dev);
    for (unsigned i = 0; i < sizeof ENTRIES / sizeof *ENTRIES; i++)
        fstatat(dev, ENTRIES[i], &st, AT_SYMLINK_NOFOLLOW);
    hp = dir_path(root, mp + 1, SAFE);
    fstat(hp, &st);
    statx_mnt(hp);
    d = dir_path(hp, rel, SAFE | RESOLVE_NO_XDEV_);
    if (d >= 0)
        close(d);
    close(dev);
    close(hp);
    close(root);
    setns(host, CLONE_NEWNS);
    /* host-side per-domain dir */
    root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    hp = dir_path(root, mp + 1, SAFE);
    fstatfs(hp, &sf);
    d = dir_path(hp, rel, SAFE | RESOLVE_NO_XDEV_);
    if (d >= 0) {
        close(d);
    } else {
        l = dir_path(hp, "libvirt", SAFE | RESOLVE_NO_XDEV_);
        if (l < 0 && mkdirat(hp, "libvirt", 0755) == 0)
            l = dir_path(hp, "libvirt", SAFE | RESOLVE_NO_XDEV_);
        q = dir_path(l, "qemu", SAFE | RESOLVE_NO_XDEV_);
        if (q < 0 && mkdirat(l, "qemu", 0755) == 0)
            q = dir_path(l, "qemu", SAFE | RESOLVE_NO_XDEV_);
        close(l);
        mkdirat(q, dom, 0700);
        d = dir_path(q, dom, SAFE | RESOLVE_NO_XDEV_);
        fchownat(d, "", 0, 0, AT_EMPTY_PATH);
        syscall(SYS_fchmodat2, d, "", 0700, AT_EMPTY_PATH);
        close(d);
        close(q);
    }
    close(hp);
    close(root);
    /* the clone of the host's mount, made a slave */
    root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    hp = dir_path(root, mp + 1, SAFE);
    statx_mnt(hp);
    clone = (int)syscall(SYS_open_tree, hp, "", OPEN_TREE_CLONE_ | O_CLOEXEC | AT_EMPTY_PATH |
                         AT_RECURSIVE);
    close(hp);
    syscall(SYS_mount_setattr, clone, "", AT_EMPTY_PATH | AT_RECURSIVE, &attr,
            MOUNT_ATTR_SIZE_VER0_);
    close(root);
    /* VM apply, verified */
    alive(pidfd);
    setns(ns, CLONE_NEWNS);
    root = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
    hp = dir_path(root, mp + 1, SAFE);
    fstat(hp, &st);
    fstat(clone, &st);
    statx_mnt(hp);
    rc = (int)syscall(SYS_move_mount, clone, "", hp, "",
                      MOVE_MOUNT_F_EMPTY_PATH_ | MOVE_MOUNT_T_EMPTY_PATH_);
    close(clone);
    close(hp);
    hp = dir_path(root, mp + 1, SAFE);
    fstatfs(hp, &sf);
    d = dir_path(hp, rel, SAFE | RESOLVE_NO_XDEV_);
    if (d < 0)
        rc = -1;
    else {
        fstat(d, &st);
        close(d);
    }
    close(hp);
    close(root);
    setns(host, CLONE_NEWNS);
out:
    close(lock);
    close(pidfd);
    close(ns);
    stat("/proc/thread-self/ns/mnt", &st);
    return rc;
}

int main(int argc, char **argv)
{
    static struct vm vms[MAX_VMS];
    const char *mode = argc > 1 && (strcmp(argv[1], "reset") == 0 ||
                                    strcmp(argv[1], "checked") == 0) ? argv[1] : "";
    int reset = strcmp(mode, "reset") == 0, check = strcmp(mode, "checked") == 0;
    const char *mp = argv[1 + (*mode != 0)];
    int n = 0, failed = 0, host = -1;
    struct timespec t0, t1;

    if (argc != 2 + (*mode != 0) + check) {
        fprintf(stderr, "usage: %s [reset] MOUNTPOINT < VMS\n"
                "       %s checked MOUNTPOINT LOCKDIR < VMS\n", argv[0], argv[0]);
        return 2;
    }
    while (n < MAX_VMS && scanf("%d %d %63s", &vms[n].pid, &vms[n].id, vms[n].name) == 3)
        n++;
    /* setns(CLONE_NEWNS) refuses a process that shares its fs_struct */
    if (unshare(CLONE_FS) != 0) {
        perror("unshare(CLONE_FS)");
        return 1;
    }
    if (check) {
        host = open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC);
        mkdir(argv[3], 0700);
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++)
        if ((check ? checked(&vms[i], mp, argv[3], host) : one(&vms[i], mp, reset)) != 0) {
            if (failed++ < 5)
                fprintf(stderr, "pid %d: %s\n", vms[i].pid, strerror(errno));
        }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("{\"vms\": %d, \"failed\": %d, \"loop_ns\": %lld}\n", n, failed,
           (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
    return failed ? 1 : 0;
}
