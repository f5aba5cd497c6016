"""Which VMs nsmount manages: from the running service, else from the records."""

from __future__ import annotations

import logging
from typing import Any


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
