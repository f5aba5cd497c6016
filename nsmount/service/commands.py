"""CLI glue for ``nsmount serve`` and ``nsmount list`` (kept out of cli.py)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ..model.display import escape_name, safe_line

Lazy = Callable[[str, str], Callable[[argparse.Namespace], int]]


def add_parsers(sub: Any, lazy: Lazy) -> None:
    sp = sub.add_parser("serve", help="resident service: keep every VM right as the host "
                        "changes (mount and device events, VM starts/exits, a local socket)")
    sp.add_argument("--config", metavar="FILE", help="host configuration (default "
                    "$NSMOUNT_CONFIG or /etc/nsmount/nsmount.conf)")
    sp.add_argument("--metrics-file", metavar="PATH",
                    help="write Prometheus text metrics here (atomically)")
    sp.add_argument("--libvirt-state-dir")
    sp.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                    help="deadline per VM (default from the config, else 30)")
    sp.add_argument("--jobs", type=int, default=None, help="worker processes per batch")
    sp.add_argument("-q", "--quiet", action="count", default=0)
    sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
    sp.set_defaults(func=lazy("service.commands", "cmd_serve"))

    sp = sub.add_parser("list", help="VMs nsmount manages (from the service when it runs)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--libvirt-state-dir")
    sp.set_defaults(func=lazy("service.commands", "cmd_list"))


def cmd_serve(args: argparse.Namespace) -> int:
    from . import config
    from .serve import Service

    level = logging.INFO + 10 * (args.quiet - args.verbose)
    logging.getLogger().setLevel(max(logging.DEBUG, min(logging.CRITICAL, level)))
    cfg = config.load(args.config)  # a bad file at start is an error (exit 3)
    if args.timeout is not None and not 0 < args.timeout <= 86400:
        raise config.ConfigError("--timeout must be in (0, 86400]")
    svc = Service(cfg, config_arg=args.config, sdir=args.state_dir,
                  lvdir=args.libvirt_state_dir, metrics_file=args.metrics_file,
                  timeout=args.timeout, workers=args.jobs)
    svc.start()
    svc.run()
    return 0


def vms_from_records(sdir: str | None, lvdir: str | None) -> list[dict[str, Any]]:
    """Without a service: nsmount's records (those of exited VMs dropped) and libvirt's
    running domains."""
    from ..reconnect import discover

    out = []
    for c in discover(sdir=sdir, lvdir=lvdir, scan=False):
        d: dict[str, Any] = {"pid": c.pid, "name": c.name,
                             "source": c.spec.source if c.spec else c.origin,
                             "origin": c.origin, "status": "failed" if c.error else "unknown",
                             "last_run": None, "last_repair": None, "drift": None}
        if c.error:
            d["error"] = c.error
        out.append(d)
    return sorted(out, key=lambda d: (d["name"] or "", d["pid"]))


def list_vms(sdir: str | None = None, lvdir: str | None = None,
             timeout: float = 10.0) -> tuple[str, list[dict[str, Any]]]:
    """("service" | "records", the VMs)."""
    from .client import ServiceUnavailable, call

    try:
        res = call({"op": "list"}, timeout, sdir=sdir)
        return "service", list(res.get("vms", []))
    except ServiceUnavailable as exc:
        logging.getLogger("nsmount").info("%s; reading the records", exc)
    return "records", vms_from_records(sdir, lvdir)


def _when(t: object) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def print_list(origin: str, vms: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"from": origin, "vms": vms}, indent=1, default=str))
        return
    print(f"{'PID':>8} {'NAME':<24} {'SOURCE':<15} {'STATUS':<10} {'LAST REPAIR':<19} DRIFT")
    for v in vms:
        drift = v.get("drift")
        shown = "-" if drift is None else (",".join(map(str, drift)) or "none")
        print(safe_line(f"{v.get('pid', '?'):>8} {escape_name(v.get('name') or '-'):<24} "
                        f"{escape_name(v.get('source', '-')):<15} {v.get('status', '?'):<10} "
                        f"{_when(v.get('last_repair')):<19} {escape_name(shown)}"))
    print(f"{len(vms)} VM(s) (from the {origin})")


def cmd_list(args: argparse.Namespace) -> int:
    origin, vms = list_vms(args.state_dir, args.libvirt_state_dir)
    print_list(origin, vms, as_json=args.json)
    return 0
