/* The floor of a reconnect: the least work that makes a hugetlbfs (and a per-domain
 * directory) visible inside N running VMs, in one process, no checks, no planning.
 *
 *   floor_reconnect [reset] MOUNTPOINT < VMS
 *
 * VMS: one "PID DOMAIN_ID NAME" line per VM.  For each VM: pidfd_open, setns(pidfd,
 * CLONE_NEWNS), mkdir MOUNTPOINT, mount -t hugetlbfs -o pagesize=2M, mkdir -p
 * MOUNTPOINT/libvirt/qemu/ID-NAME.  "reset" instead detaches MOUNTPOINT in every VM
 * (so the next run does the work again).  Prints one JSON line: {"vms", "failed",
 * "loop_ns"} (loop_ns: the loop alone, without process start-up and reading stdin).
 * Used by bench/bench_floor.py, compiled at bench run time with cc -O2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define MAX_VMS 100000

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

int main(int argc, char **argv)
{
    static struct vm vms[MAX_VMS];
    int reset = argc > 1 && strcmp(argv[1], "reset") == 0;
    const char *mp = argv[1 + reset];
    int n = 0, failed = 0;
    struct timespec t0, t1;

    if (argc != 2 + reset) {
        fprintf(stderr, "usage: %s [reset] MOUNTPOINT < VMS\n", argv[0]);
        return 2;
    }
    while (n < MAX_VMS && scanf("%d %d %63s", &vms[n].pid, &vms[n].id, vms[n].name) == 3)
        n++;
    /* setns(CLONE_NEWNS) refuses a process that shares its fs_struct */
    if (unshare(CLONE_FS) != 0) {
        perror("unshare(CLONE_FS)");
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++)
        if (one(&vms[i], mp, reset) != 0) {
            if (failed++ < 5)
                fprintf(stderr, "pid %d: %s\n", vms[i].pid, strerror(errno));
        }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("{\"vms\": %d, \"failed\": %d, \"loop_ns\": %lld}\n", n, failed,
           (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
    return failed ? 1 : 0;
}
