#!/usr/bin/env python3
"""Benchmark: ``nsmount serve`` -- host mount to visible in every VM, and idle cost.

    python3 bench/bench_serve.py [--sizes 10,100] [--reps 8] [--idle 60] [--json PATH]

Inside ``tests/sandbox.py``'s sandbox (a throwaway mount+PID namespace playing a
hypervisor host; the real host is never touched).  For each N: N stand-in VMs
(``launcher.launch(spec, ["sleep", "1000"])``) and the service (``nsmount serve``, its
the default config: debounce 20 ms).  Each repetition starts N fresh VMs (the last ones
killed, the last hugetlbfs unmounted: every repetition does the same work), waits
until the service tracks them and is idle, then mounts a fresh hugetlbfs at
``/dev/hpK`` on the sandbox host (a path no VM has yet: under ``/dev`` it never
propagates by itself), from this process (mount(2), no mount(8) start-up in the
figure), and waits until every VM sees it with its per-domain directory, no command
run.

  svc_ms   the service's own clock: its first mount event -> the last VM of the batch
           done (its log line "done in ..., X after its first event"); p50/p99 over
           reps.  Nothing disturbs the service while it works.
  all_ms   mount(2) -> this bench sees the mount and dir in the last of the N VMs,
           looking every 20 ms (statfs through ``/proc/PID/root``): a cross-check
           with 20 ms resolution.  Watching more closely disturbs what it measures on
           2 cores: a 2-5 ms poller, or a fanotify mount watch on every VM's namespace,
           made the service's own figure 1.5-2x worse.
  vm_ms    the same for one VM (p50/p99 over every VM and rep)
  idle     CPU seconds (user+sys: the service, its warm workers, its reaped jobs)
           over ``--idle`` seconds (default 60) with the largest N (default 100) and
           no events of ours: ~0 means no polling loop.  The machine's own uevents
           still arrive (/dev/kvm sends one whenever any KVM guest starts or stops);
           the batches and events counted in that window are reported with it

Target (issue 10): <= 100 ms at N = 100; idle ~ 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RESULTS, header, run_sandbox_main, write_result



def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def sandbox_main(cfg: dict[str, Any]) -> None:
    import benchlib
    import json
    import subprocess
    import time

    import ctypes
    import re

    from nsmount.faces.launcher import launch
    from nsmount.model.spec import VmSpec

    py = sys.executable
    log = open("/tmp/serve.log", "a")  # noqa: SIM115 - the services' stderr, for the run
    with open("/tmp/nsmount.conf", "w") as fh:
        fh.write(os.environ.get("NSMOUNT_BENCH_CONF", ""))  # the defaults (debounce 20 ms)

    talk, settle = benchlib.talk, benchlib.settle

    libc = ctypes.CDLL(None, use_errno=True)

    def _mount(mp: str) -> None:
        # in this process, so that t0 is the mount and not the start of mount(8)
        if libc.mount(b"hugetlbfs", mp.encode(), b"hugetlbfs", 0, None) != 0:
            raise OSError(ctypes.get_errno(), "mount hugetlbfs", mp)

    def sees(pid: int, name: str, did: int, mp: str) -> bool:
        return benchlib.sees_hugetlbfs(pid, mp, f"libvirt/qemu/{did}-{name}")

    out: dict[str, Any] = {"sizes": {}}
    k = 0
    svc = None
    vms: list[Any] = []
    def fresh_vms(old: list[Any], n: int) -> list[Any]:
        """New VMs (the old ones killed), once the service tracks them and is idle."""
        for vm in old:
            os.kill(vm.pid, 9)
            vm.wait()
        new = [launch(VmSpec(name=f"g{i}", domain_id=i + 1), ["sleep", "1000"])
               for i in range(n)]
        pids = {vm.pid for vm in new}
        while {v["pid"] for v in talk({"op": "list"})["vms"]} != pids:
            time.sleep(0.05)
        settle()
        return new

    for n in cfg["sizes"]:
        if svc is not None:
            svc.terminate()
            svc.wait()
        svc = subprocess.Popen([py, "-m", "nsmount", "serve", "--config",
                                "/tmp/nsmount.conf"], stderr=log)
        while not os.path.exists("/run/nsmount/nsmount.sock"):
            time.sleep(0.02)
        alls, per_vm, svc_ms = [], [], []
        poll = float(os.environ.get("NSMOUNT_BENCH_POLL") or 0.02)
        for _ in range(cfg["reps"]):
            # every repetition starts alike: fresh VMs, and the host holds only the
            # hugetlbfs about to be mounted (each VM gets every hugetlbfs mount: with
            # the earlier ones left, every repetition would do more work per VM)
            if k:
                libc.umount2(f"/dev/hp{k}".encode(), 2)  # MNT_DETACH
            vms = fresh_vms(vms, n)
            k += 1
            mp = f"/dev/hp{k}"
            os.makedirs(mp)
            logged = len(Path("/tmp/serve.log").read_text().splitlines())
            seen: dict[int, float] = {}
            t0 = time.perf_counter()
            _mount(mp)
            while len(seen) < n:  # gently: a poller takes CPU from the service
                time.sleep(poll)
                for i, vm in enumerate(vms):
                    if i not in seen and sees(vm.pid, f"g{i}", i + 1, mp):
                        seen[i] = time.perf_counter() - t0
                if time.perf_counter() - t0 > 60:
                    raise AssertionError(f"N={n}: only {len(seen)} VMs saw {mp}")
            alls.append(max(seen.values()) * 1000)
            per_vm += [v * 1000 for v in seen.values()]
            settle()
            new = Path("/tmp/serve.log").read_text().splitlines()[logged:]
            after = [float(m.group(1)) * 1000 for ln in new
                     if (m := re.search(r", ([0-9.]+)s after its first event", ln))]
            assert after, new
            svc_ms.append(max(after))
        out["sizes"][str(n)] = {"svc_ms": {"p50": _pct(svc_ms, 50), "p99": _pct(svc_ms, 99),
                                           "samples": svc_ms},
                                "all_ms": {"p50": _pct(alls, 50), "p99": _pct(alls, 99),
                                           "samples": alls},
                                "vm_ms": {"p50": _pct(per_vm, 50), "p99": _pct(per_vm, 99)}}
    assert svc is not None
    settle()

    def cpu(pid: int) -> float:
        """The service's CPU seconds: its own, its reaped children's, and its live
        children's (the warm workers live as long as the service)."""
        def fields(p: str) -> list[str]:
            return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

        ticks = sum(int(x) for x in fields(str(pid))[11:15])
        for p in os.listdir("/proc"):
            try:
                f = fields(p) if p.isdigit() else None
            except OSError:
                continue
            if f and int(f[1]) == pid:
                ticks += sum(int(x) for x in f[11:13])
        return ticks / os.sysconf("SC_CLK_TCK")

    k0 = talk({"op": "status"})["counters"]
    c0, t0 = cpu(svc.pid), time.time()
    time.sleep(cfg["idle"])
    c1, t1 = cpu(svc.pid), time.time()
    k1 = talk({"op": "status"})["counters"]
    events = {k: v - k0["events"].get(k, 0) for k, v in k1["events"].items()
              if v != k0["events"].get(k, 0)}
    out["idle"] = {"vms": cfg["sizes"][-1], "seconds": round(t1 - t0, 1),
                   "cpu_seconds": round(c1 - c0, 4),
                   "batches": k1["batches"] - k0["batches"], "events": events}
    svc.terminate()
    svc.wait()
    lines = Path("/tmp/serve.log").read_text().splitlines()
    out["batches"] = [ln.split("INFO: ")[-1].strip() for ln in lines if "done in" in ln][-6:]
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,100")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--json", default=str(RESULTS / "serve.json"))
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    print(header("serve", sizes=a.sizes, reps=a.reps, idle=a.idle))
    res, elapsed = run_sandbox_main("bench_serve", {"sizes": sizes, "reps": a.reps,
                                                    "idle": a.idle},
                                    hugetlbfs=[], timeout=600 + a.idle)
    print(f"{'N':>5} {'svc p50':>9} {'svc p99':>9} {'all p50':>9} {'all p99':>9} "
          f"{'vm p50':>9} {'vm p99':>9}   (ms)")
    for n, r in res["sizes"].items():
        print(f"{n:>5} {r['svc_ms']['p50']:9.1f} {r['svc_ms']['p99']:9.1f} "
              f"{r['all_ms']['p50']:9.1f} {r['all_ms']['p99']:9.1f} "
              f"{r['vm_ms']['p50']:9.1f} {r['vm_ms']['p99']:9.1f}")
    for line in res.get("batches", []):
        print("  service:", line)
    idle = res["idle"]
    print(f"idle: {idle['cpu_seconds']} CPU s over {idle['seconds']} s with {idle['vms']} VMs "
          f"({idle['batches']} batches; events that arrived: {idle['events'] or 'none'})")
    write_result(a.json, "serve", {"params": vars(a), "elapsed": elapsed, **res})


if __name__ == "__main__":
    main()
