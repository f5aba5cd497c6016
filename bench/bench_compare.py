#!/usr/bin/env python3
"""Run one of the benches for this checkout and for an earlier revision, side by side.

    python3 bench/bench_compare.py --base REV [--rounds 3] reconnect --sizes 100,1000
    python3 bench/bench_compare.py --base REV launch --n 30

The earlier revision is checked out with ``git worktree`` into a temporary directory
(removed afterwards).  The two are run alternately, ``--rounds`` times each, so load
from other work on the machine hits both about equally; the same interpreter runs both.
Each run writes its bench's JSON; the medians over the rounds are compared:
``this/base`` below 1.10 means "within 10 %".  Results: table on stdout, JSON in
``bench/results/compare-<bench>.json``.  Needs root (the benches use the sandbox).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _rows(bench: str, data: dict[str, Any]) -> dict[str, float]:
    """(row name -> seconds or ms) of one bench's JSON, the rows worth comparing."""
    out: dict[str, float] = {}
    if bench == "reconnect":
        for r in data["rows"]:
            if r["variant"] == "nsmount":
                out[f"reconnect N={r['n']} wall s"] = r["wall_s"]
                if r.get("lib_s") is not None:
                    out[f"reconnect N={r['n']} library s"] = r["lib_s"]
    else:
        for name, st in (data.get("stats_ms") or data.get("stats") or {}).items():
            if isinstance(st, dict) and "median" in st:
                out[f"{name} median ms"] = st["median"]
    return out


def _run(checkout: Path, bench: str, args: list[str], out: Path) -> dict[str, float]:
    script = checkout / "bench" / f"bench_{bench}.py"
    flag = "--out" if bench == "reconnect" else "--json"
    proc = subprocess.run([sys.executable, str(script), *args, flag, str(out)],
                          cwd=checkout, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                         f"\n{proc.stderr[-2000:]}")
    return _rows(bench, json.loads(out.read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("bench", choices=("reconnect", "launch", "hotplug"))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the bench")
    a = ap.parse_args()
    samples: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    with tempfile.TemporaryDirectory(prefix="nsmount-base-") as tmp:
        base = Path(tmp) / "checkout"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(base), a.base], check=True)
        try:
            for i in range(a.rounds):
                for who, checkout in (("base", base), ("this", ROOT)):
                    got = _run(checkout, a.bench, a.args, Path(tmp) / f"{who}{i}.json")
                    for k, v in got.items():
                        samples[who].setdefault(k, []).append(v)
                    print(f"round {i + 1}/{a.rounds} {who}: "
                          + ", ".join(f"{k}={v:.4g}" for k, v in got.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base)], check=False)
    rows = []
    for k in samples["this"]:
        if k not in samples["base"]:
            continue
        b, t = statistics.median(samples["base"][k]), statistics.median(samples["this"][k])
        rows.append({"row": k, "base": b, "this": t, "this/base": round(t / b, 3) if b else None})
    print(f"\n{'row':<34} {'base':>10} {'this':>10} {'this/base':>9}")
    for r in rows:
        print(f"{r['row']:<34} {r['base']:>10.4g} {r['this']:>10.4g} {r['this/base']!s:>9}")
    out = ROOT / "bench" / "results" / f"compare-{a.bench}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base": a.base, "rounds": a.rounds, "args": a.args,
                               "samples": samples, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
