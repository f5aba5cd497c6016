#!/usr/bin/env python3
"""Reconnect benchmark: N stand-in VMs need a hugetlbfs mount and their per-domain dir.

For N in (10, 100, 1000) (``--sizes``), inside a private sandbox (tests/sandbox.py), with
fresh VMs for every variant (``nsmount.faces.launcher.launch``, ``sleep``; hugetlbfs mounted on
the sandbox host at /dev/hugepages only after they started):

* ``nsmount``  ``python3 -m nsmount reconnect --no-scan --json`` (whole CLI process:
               interpreter start-up, discovery, pidfds, thread pool, open_tree clone
               replayed, per-domain dir); ``lib s`` is reconnect()'s own timing;
* ``nsenter``  a shell loop: ``nsenter -t PID -m sh -c 'mkdir -p /dev/hugepages &&
               mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages && mkdir -p
               /dev/hugepages/libvirt/qemu/ID-NAME'`` per VM;
* ``fork``     libvirt's way: a Python loop that forks one child per VM and action
               (mkdir, mount, mkdir -p), each child setns()es through a pidfd
               (nsmount.kernel.syscalls) and does that one action.

Every variant's result is verified (each VM sees a hugetlbfs with its dir).  Peak RSS
is the measured process's maxrss (RUSAGE_SELF of the driver for ``fork``, RUSAGE_CHILDREN
of a fresh wrapper for the others).  Targets: 1000 VMs <= 1 s, >= 5x the nsenter loop,
flat per-VM cost.  ``--profile`` adds a cProfile of nsmount's reconnect() (all threads)
at the largest N.  Results: table on stdout, JSON in bench/results/reconnect.json.

Needs root (sandbox).  Usage: ``python3 bench/bench_reconnect.py [--sizes 10,100,1000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from sandbox import run_in_sandbox  # noqa: E402

SANDBOX_CODE = r'''
import json, os, resource, signal, subprocess, sys, time
from nsmount.faces.launcher import launch
from nsmount.model.spec import VmSpec

PY = sys.executable
N = int(os.environ["BENCH_N"])
VARIANTS = os.environ["BENCH_VARIANTS"].split(",")
PROFILE = os.environ.get("BENCH_PROFILE") == "1"
HP = "/dev/hugepages"
HUGETLBFS_MAGIC = 0x958458f6


def start(n):
    vms = [launch(VmSpec(name=f"guest{i}", domain_id=i + 1), ["sleep", "1000"])
           for i in range(n)]
    for vm in vms:
        while open(f"/proc/{vm.pid}/comm").read().strip() != "sleep":
            time.sleep(0.002)
    return vms


def stop(vms):
    for vm in vms:
        os.kill(vm.pid, signal.SIGKILL)
    for vm in vms:
        vm.wait()
        vm.close()
    subprocess.run(["rm", "-rf", "/run/nsmount"], check=True)


def verify(vms):
    from nsmount.kernel import syscalls
    bad = 0
    for i, vm in enumerate(vms):
        p = f"/proc/{vm.pid}/root{HP}"
        try:
            fd = os.open(p, os.O_PATH)
            try:
                ok = syscalls.fstatfs(fd)[0] == HUGETLBFS_MAGIC
            finally:
                os.close(fd)
            ok = ok and os.path.isdir(f"{p}/libvirt/qemu/{i + 1}-guest{i}")
        except OSError:
            ok = False
        bad += not ok
    return bad


WRAP = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
with open("/run/bench-out", "w") as out:
    r = subprocess.run(sys.argv[1:], stdout=out, stderr=subprocess.PIPE, text=True)
w = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": r.returncode, "wall": w, "maxrss_kb": ru.ru_maxrss,
                  "stderr": r.stderr[-2000:]}))
"""

FORK = r"""
import json, os, resource, sys, time
from nsmount.kernel import consts as C, syscalls
pids = json.loads(sys.argv[1])

def in_ns(pidfd, fn):
    child = os.fork()
    if child == 0:
        code = 1
        try:
            syscalls.setns(pidfd, C.CLONE_NEWNS)
            fn()
            code = 0
        finally:
            os._exit(code)
    _, st = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(st)

t = time.perf_counter()
fails = 0
for i, pid in enumerate(pids):
    fd = os.pidfd_open(pid)
    d = f"/dev/hugepages/libvirt/qemu/{i + 1}-guest{i}"
    fails += in_ns(fd, lambda: os.makedirs("/dev/hugepages", exist_ok=True))
    fails += in_ns(fd, lambda: syscalls.mount("nodev", "/dev/hugepages", "hugetlbfs", 0,
                                              "pagesize=2M"))
    fails += in_ns(fd, lambda: os.makedirs(d, exist_ok=True))
    os.close(fd)
w = time.perf_counter() - t
print(json.dumps({"rc": int(bool(fails)), "wall": w,
                  "maxrss_kb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)}))
"""

PROF = r"""
import cProfile, io, json, os, pstats
from nsmount.engine.hoststate import HostState
from nsmount.faces import reconnect as R
from nsmount.pipeline.session import host_ns_fd
from nsmount.pipeline.vm import run_safe
# the per-VM work runs in forked workers; profile the same function in-process
jobs = [R.job_for(c, bulk=True) for c in R.discover(scan=False)]
host = HostState.read()
hfd = host_ns_fd()
prof = cProfile.Profile()
prof.enable()
outs = [run_safe(j, host, hfd) for j in jobs]
prof.disable()
st = pstats.Stats(prof)
s = io.StringIO()
st.stream = s
st.sort_stats("tottime").print_stats(15)
st.sort_stats("cumulative").print_stats("nsmount", 40)
summary = {}
for o in outs:
    summary[o.status] = summary.get(o.status, 0) + 1
print(json.dumps({"summary": summary, "seconds": 0, "profile": s.getvalue()}))
"""


def run_variant(name, vms):
    if name == "nsmount":
        cmd = [PY, "-c", WRAP, PY, "-m", "nsmount", "reconnect", "--no-scan", "--json"]
    elif name == "nsenter":
        lines = [f"nsenter -t {vm.pid} -m sh -c 'mkdir -p {HP} && mount -t hugetlbfs -o "
                 f"pagesize=2M nodev {HP} && mkdir -p {HP}/libvirt/qemu/{i + 1}-guest{i}' "
                 f"|| fail=1"
                 for i, vm in enumerate(vms)]
        script = "fail=0\n" + "\n".join(lines) + "\nexit $fail\n"
        with open("/run/loop.sh", "w") as fh:
            fh.write(script)
        cmd = [PY, "-c", WRAP, "sh", "/run/loop.sh"]
    elif name == "fork":
        cmd = [PY, "-c", FORK, json.dumps([vm.pid for vm in vms])]
    elif name == "profile":
        cmd = [PY, "-c", PROF]
    r = subprocess.run(cmd, capture_output=True, text=True)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise AssertionError(f"{name}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    if name == "nsmount":
        with open("/run/bench-out") as fh:
            rep = json.load(fh)
        res["lib_seconds"] = rep["seconds"]
        res["summary"] = rep["summary"]
    return res


out = {}
for name in VARIANTS:
    vms = start(N)
    os.makedirs(HP, exist_ok=True)
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", HP], check=True)
    res = run_variant(name, vms)
    if name != "profile":
        res["unverified"] = verify(vms)
    out[name] = res
    stop(vms)
    subprocess.run(["umount", HP], check=True)
print(json.dumps(out))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--variants", default="nsmount,nsenter,fork")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile nsmount's reconnect at the largest N")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reconnect.json"))
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    variants = args.variants.split(",")
    rows = []
    for n in sizes:
        vs = variants + (["profile"] if args.profile and n == max(sizes) else [])
        res = run_in_sandbox(SANDBOX_CODE, timeout=900,
                             env={"BENCH_N": str(n), "BENCH_VARIANTS": ",".join(vs)})
        data = res.json()
        for name in variants:
            d = data[name]
            rows.append({"n": n, "variant": name, "wall_s": round(d["wall"], 4),
                         "per_vm_ms": round(1000 * d["wall"] / n, 3),
                         "lib_s": round(d["lib_seconds"], 4) if "lib_seconds" in d else None,
                         "rc": d["rc"], "unverified": d["unverified"],
                         "maxrss_mb": round(d["maxrss_kb"] / 1024, 1)})
        if "profile" in data:
            print(f"--- cProfile of reconnect() at N={n} (all threads, by tottime) ---")
            print(data["profile"]["profile"])
    base = {r["n"]: r["wall_s"] for r in rows if r["variant"] == "nsmount"}
    for r in rows:
        r["x_nsmount"] = round(r["wall_s"] / base[r["n"]], 2) if base.get(r["n"]) else None
    hdr = (f"{'N':>5} {'variant':<8} {'wall s':>8} {'ms/VM':>7} {'lib s':>7} "
           f"{'x nsmount':>9} {'RSS MB':>7} {'rc':>3} {'bad':>4}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        lib = f"{r['lib_s']:.3f}" if r["lib_s"] is not None else "-"
        print(f"{r['n']:>5} {r['variant']:<8} {r['wall_s']:>8.3f} {r['per_vm_ms']:>7.2f} "
              f"{lib:>7} {r['x_nsmount']:>9} {r['maxrss_mb']:>7} {r['rc']:>3} "
              f"{r['unverified']:>4}")
    top = max(sizes)
    ns = next((r for r in rows if r["n"] == top and r["variant"] == "nsmount"), None)
    ne = next((r for r in rows if r["n"] == top and r["variant"] == "nsenter"), None)
    targets = {}
    if ns:
        targets[f"{top} VMs <= 1 s"] = ns["wall_s"] <= 1.0 if top >= 1000 else None
        per = [r["per_vm_ms"] for r in rows if r["variant"] == "nsmount" and r["n"] >= 100]
        targets["flat per-VM cost (N>=100 within 2x)"] = (max(per) <= 2 * min(per)
                                                          if len(per) > 1 else None)
    if ns and ne:
        targets[">= 5x faster than nsenter loop"] = ne["wall_s"] / ns["wall_s"] >= 5
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else ('n/a' if v is None else 'MISSED')}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                            "python": platform.python_version()},
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
                   "targets": targets}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
