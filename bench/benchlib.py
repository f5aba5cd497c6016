"""What the benches share: statistics, running a bench's ``sandbox_main`` inside a
private sandbox host, the machine description, and writing the result file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
HUGETLBFS_MAGIC = 0x958458F6


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) > 1 else s[0]
    return {"median": statistics.median(s), "p90": p90, "min": s[0], "max": s[-1],
            "mean": statistics.fmean(s), "n": len(s)}


def run_sandbox_main(module: str, cfg: dict[str, Any], *, hugetlbfs: list[str],
                     timeout: float) -> tuple[Any, float]:
    """Run ``bench/<module>.py``'s ``sandbox_main(cfg)`` as the host of a fresh sandbox;
    returns (its JSON result, elapsed seconds)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from sandbox import run_in_sandbox

    code = (f"import sys\nsys.path.insert(0, {str(BENCH_DIR)!r})\n"
            f"import {module}\n{module}.sandbox_main({cfg!r})\n")
    res = run_in_sandbox(code, hugetlbfs=hugetlbfs, timeout=timeout)
    return res.json(), res.elapsed


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "machine": platform.machine()}


def header(bench: str, **params: object) -> str:
    shown = " ".join(f"{k}={v}" for k, v in params.items())
    return (f"nsmount {bench} bench: {shown}, {os.cpu_count()} CPUs, "
            f"kernel {platform.release()}, Python {platform.python_version()}")


def write_result(path: str, bench: str, body: dict[str, Any]) -> Path:
    out = {"bench": bench, "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": machine(), **body}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {p}")
    return p


# --------------------------------------------------------------- the service, in a sandbox
SOCK = "/run/nsmount/nsmount.sock"


def talk(obj: dict[str, Any], path: str = SOCK, timeout: float = 60) -> Any:
    """One request to ``nsmount serve``; its result (AssertionError on an error)."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps({"v": 1, **obj}) + "\n").encode())
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(1 << 20)
            assert chunk, f"the service closed the connection: {buf!r}"
            buf += chunk
    ans = json.loads(buf)
    assert ans.get("ok"), ans
    return ans["result"]


def settle(path: str = SOCK) -> None:
    """Until the service has had nothing to do for three looks 0.1 s apart."""
    import time

    quiet = 0
    while quiet < 3:
        st = talk({"op": "status"}, path)
        busy = st["batch_running"] or st["jobs"] or st["queued"] or st["pending_vms"]
        quiet = 0 if busy else quiet + 1
        time.sleep(0.1)


def sees_hugetlbfs(pid: int, mp: str, domain_dir: str) -> bool:
    """True when VM ``pid`` sees a hugetlbfs at ``mp`` with ``mp/domain_dir`` on it
    (statfs through ``/proc/PID/root``; the bench is the sandbox's root)."""
    from nsmount.kernel import syscalls

    p = f"/proc/{pid}/root{mp}"
    try:
        fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if syscalls.fstatfs(fd)[0] != HUGETLBFS_MAGIC:
            return False
    finally:
        os.close(fd)
    return os.path.isdir(f"{p}/{domain_dir}")
