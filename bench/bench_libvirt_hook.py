"""What the installed libvirt hook costs libvirt: creating N small domains with the hook
vs without it, ``nsmount serve`` running, in one session.

Runs in a sandbox host with a private libvirt world (the machinery of
integration/scenarios/libvirt.py: tmpfs over libvirt's dirs, virtlogd and libvirtd
started inside; ``integration/libvirt_setup.sh`` prepares the machine).  The hook is
installed before libvirtd starts (libvirt looks for hooks then); "without" clears its
executable bit, which libvirt checks at every call, so both modes run against the same
daemon and the runs can alternate (``--reps`` pairs, order flipped every pair).  One run
= ``virsh create --paused`` of N diskless 64 MiB domains in one virsh session (timed;
paused so that running guests do not take the CPU from the next creations), then
``virsh destroy`` of all of them (timed separately).  Then N domains run and libvirtd
is restarted (``--restart-reps`` per mode, alternating): timed from SIGTERM until every
domain answers a monitor command, i.e. libvirt's reconnect of each (which runs the
``reconnect`` hook) is done.  Then the hook's own time per
operation: the installed script run directly for an ignored operation (``prepare
begin``) and for ``started begin`` of a running domain (answered by the service), next
to ``sh -c true``, and for ``reconnect begin`` (the service always runs the pipeline
for it; a ``started`` soon after the service checked the VM is answered from that check).

    python3 bench/bench_libvirt_hook.py [--n 10] [--reps 5]

Target (issue 10): creating VMs with the hook ≤ 1.10x without it.  Besides the ratio of
the medians, the median of each round's own ratio is shown (a round's runs are next to
each other in time: less sensitive to other work on the machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO_ROOT, RESULTS, header, run_sandbox_main, stats, write_result

HOOK = "/etc/libvirt/hooks/qemu.d/50-nsmount"
#: none: the hook not executable; exit0: a hook that is only ``exit 0`` (what libvirt's
#: running of any hook costs); hook: nsmount's
MODES = ("hook", "none", "exit0")


def _timed(cmd: list[str], stdin: str = "") -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}: {r.stderr.strip()[-500:]}")
    return dt


def sandbox_main(cfg: dict[str, Any]) -> None:
    sys.path.insert(0, str(REPO_ROOT / "integration"))
    from scenarios.libvirt import (
        URI,
        domain_xml,
        private_libvirt,
        restart_libvirtd,
        start_daemons,
        stop_daemons,
    )
    from scenarios.libvirt_serve import kvm_or_tcg
    from scenarios.serve import LOG, serve
    from vmhelpers import PY, emit, read_text, sh

    n, reps = int(cfg["n"]), int(cfg["reps"])
    private_libvirt(str(REPO_ROOT))
    sh([PY, "-m", "nsmount", "install-hook", "--hooks-dir", "/etc/libvirt/hooks"])
    start_daemons()
    serve()
    dtype = kvm_or_tcg()
    names = [f"bench{i}" for i in range(n)]
    for name in names:
        with open(f"/run/{name}.xml", "w") as fh:
            fh.write(domain_xml(name, dtype, None))
    virsh = ["virsh", "-q", "-c", URI]
    # paused: the guests' vCPUs never run, so running guests (nested KVM or TCG on a
    # small machine) do not eat the CPU the next creations are timed on
    create = virsh + ["; ".join(f"create --paused /run/{name}.xml" for name in names)]
    destroy = virsh + ["; ".join(f"destroy {name}" for name in names)]

    # after a restart: every domain reconnected (a monitor command needs the domain's
    # job, which libvirt's reconnect thread holds until it is done, hook included)
    reconnected = virsh + ["; ".join(f"qemu-monitor-command {name} --hmp 'info status'"
                                     for name in names)]

    nsmount_hook = read_text(HOOK)

    def use(mode: str) -> None:
        with open(HOOK, "w") as fh:
            fh.write(nsmount_hook if mode == "hook" else "#!/bin/sh\nexit 0\n")
        os.chmod(HOOK, 0o644 if mode == "none" else 0o755)

    samples: dict[str, dict[str, list[float]]] = {
        m: {"create": [], "destroy": [], "restart": []} for m in MODES}
    try:
        for rep in range(reps + 1):  # the first round is a warm-up
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for mode in order:
                use(mode)
                tc = _timed(create)
                td = _timed(destroy)
                if rep:
                    samples[mode]["create"].append(tc)
                    samples[mode]["destroy"].append(td)
        # a daemon restart with N domains running, until all are reconnected
        use("none")
        _timed(create)
        for rep in range(int(cfg["restart_reps"]) + 1):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for mode in order:
                use(mode)
                t0 = time.perf_counter()
                restart_libvirtd()
                _timed(reconnected)
                if rep:
                    samples[mode]["restart"].append(time.perf_counter() - t0)
        _timed(destroy)
        use("hook")
        lines = [ln for ln in read_text(LOG).splitlines() if " request started bench" in ln]
        served = len(lines)
        reconnects = sum(" request reconnect bench" in ln for ln in read_text(LOG).splitlines())
        # what the service itself took per 'started' request (its log: "... in 0.012s")
        service_ms = [float(ln.rsplit(" in ", 1)[1].rstrip("s")) * 1000 for ln in lines]

        # the hook's own time per operation, the service running
        _timed(["virsh", "-c", URI, "create", "--paused", f"/run/{names[0]}.xml"])
        xml = read_text(f"/run/{names[0]}.xml")
        per_op: dict[str, list[float]] = {"sh -c true": [], "ignored (prepare begin)": [],
                                          "started begin (service)": [],
                                          "reconnect begin (service)": []}
        for _ in range(int(cfg["op_reps"])):
            per_op["sh -c true"].append(_timed(["sh", "-c", "true"]))
            per_op["ignored (prepare begin)"].append(
                _timed([HOOK, names[0], "prepare", "begin", "-"], xml))
            per_op["started begin (service)"].append(
                _timed([HOOK, names[0], "started", "begin", "-"], xml))
            per_op["reconnect begin (service)"].append(  # always the whole pipeline
                _timed([HOOK, names[0], "reconnect", "begin", "-"], xml))
        _timed(["virsh", "-c", URI, "destroy", names[0]])
    finally:
        stop_daemons()
    out: dict[str, Any] = {
        "n": n, "reps": reps, "domain_type": dtype, "started_requests_served": served,
        "reconnect_requests_served": reconnects,
        "create": {m: stats(samples[m]["create"]) for m in samples},
        "destroy": {m: stats(samples[m]["destroy"]) for m in samples},
        "restart": {m: stats(samples[m]["restart"]) for m in samples},
        "per_op_ms": {k: stats([x * 1000 for x in v]) for k, v in per_op.items()},
        "service_started_ms": stats(service_ms),
        "samples": samples,
    }
    for what in ("create", "destroy", "restart"):
        # each round's own ratio (its runs are next to each other in time): less
        # sensitive to load from other work that comes and goes than the medians' ratio
        out[f"{what}_paired_ratio"] = statistics.median(
            h / z for h, z in zip(samples["hook"][what], samples["none"][what], strict=True))
        out[f"{what}_ratio"] = (statistics.median(samples["hook"][what])
                                / statistics.median(samples["none"][what]))
        out[f"{what}_ratio_exit0"] = (statistics.median(samples["exit0"][what])
                                      / statistics.median(samples["none"][what]))
    emit(**out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10, help="domains per run")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per mode")
    ap.add_argument("--op-reps", type=int, default=30, help="direct hook runs per op")
    ap.add_argument("--restart-reps", type=int, default=3,
                    help="timed daemon restarts per mode")
    ap.add_argument("--json", default=str(RESULTS / "libvirt_hook.json"))
    a = ap.parse_args()
    print(header("libvirt-hook", n=a.n, reps=a.reps))
    res, elapsed = run_sandbox_main("bench_libvirt_hook",
                                    {"n": a.n, "reps": a.reps, "op_reps": a.op_reps,
                                     "restart_reps": a.restart_reps},
                                    hugetlbfs=[], timeout=900)
    print(f"\n{'':28}{'median s':>10}{'p90 s':>10}{'min s':>10}")
    for what in ("create", "destroy", "restart"):
        for mode, label in (("none", "without hook"), ("exit0", "hook 'exit 0'"),
                            ("hook", "nsmount hook")):
            s = res[what][mode]
            print(f"{what + ' ' + label:28}{s['median']:10.3f}{s['p90']:10.3f}{s['min']:10.3f}")
        print(f"{what + ' exit0/none':28}{res[what + '_ratio_exit0']:10.3f}x")
        print(f"{what + ' nsmount/none':28}{res[what + '_ratio']:10.3f}x"
              + ("   (target <= 1.10x)" if what == "create" else ""))
        print(f"{what + ' nsmount/none paired':28}{res[what + '_paired_ratio']:10.3f}x"
              "   (median of each round's ratio)")
    print(f"\nper hook run, ms{'':12}{'median':>10}{'p90':>10}")
    for k, s in res["per_op_ms"].items():
        print(f"  {k:26}{s['median']:10.2f}{s['p90']:10.2f}")
    s = res["service_started_ms"]
    print(f"  {'(service side of started)':26}{s['median']:10.2f}{s['p90']:10.2f}")
    print(f"\n'started' requests served by the service: {res['started_requests_served']} "
          f"(expected {res['n'] * (res['reps'] + 1)}: one per domain created with the hook)")
    print(f"'reconnect' requests served by the service: {res['reconnect_requests_served']} "
          f"(expected {res['n'] * (a.restart_reps + 1)}: one per domain per restart with "
          "the hook)")
    write_result(a.json, "libvirt-hook", {"params": vars(a), "elapsed": elapsed, **res})


if __name__ == "__main__":
    main()
