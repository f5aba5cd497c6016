"""Audit trail: every change nsmount makes, inside a VM or on the host, as a log record.

Records go to the ``nsmount.faces.audit`` logger (level INFO for a change made, WARNING for
one that failed), one line each::

    vm=web1[4242] action=make-node path=/dev/null before="missing-node: ..." after="mknod
    /dev/null c 1:3 0666 0:0" result=ok

Where they end up is the caller's choice of handlers: the CLI sends them to stderr,
the libvirt hook to syslog (the journal) and stderr (libvirt keeps that in the domain's
log).  VM-supplied names are escaped; every line passes :func:`safe_line`.

Records are written from the caller's thread in the host namespace, after the work,
never from inside a VM (a syslog socket reconnecting there would reach the VM's
``/dev/log``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ..model.display import escape_name, safe_line

log = logging.getLogger("nsmount.faces.audit")


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def vm_label(name: str | None, pid: int) -> str:
    return f"{escape_name(name or '-')}[{pid}]"


def log_outcome(o: Any, *, via: str = "") -> None:
    """One record per applied action of an :class:`~nsmount.pipeline.session.Outcome`."""
    drifts: dict[str, Any] = {}
    for d in o.drifts:
        drifts.setdefault(d.path, d)
    tag = f" via={via}" if via else ""
    for r in o.results:
        a = r.action
        entry = getattr(a, "entry", None)
        path = str(getattr(a, "path", None) or getattr(entry, "path", "") or "")
        d = drifts.get(path)
        before = f"{d.kind}: {d.detail}" if d is not None else (a.reason or "-")
        result = "ok" if r.ok else f"failed: {r.error}"
        if r.ok and r.note:
            result += f" ({r.note})"
        log.log(logging.INFO if r.ok else logging.WARNING, safe_line(
            f"vm={vm_label(o.name, o.pid)} action={a.kind} path={escape_name(path)}"
            f" before={_q(before)} after={_q(a.describe())} result={_q(result)}{tag}"))


def log_outcomes(outcomes: Iterable[Any], *, via: str = "") -> None:
    for o in outcomes:
        log_outcome(o, via=via)


def log_host(action: str, path: str, *, before: str, after: str, result: str = "ok") -> None:
    """A change nsmount made to the host itself (propagation --fix, the hook files)."""
    log.log(logging.INFO if result == "ok" else logging.WARNING, safe_line(
        f"host action={action} path={escape_name(path)} before={_q(before)}"
        f" after={_q(after)} result={_q(result)}"))
