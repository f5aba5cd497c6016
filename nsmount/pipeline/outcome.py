"""What the pipeline reports: one :class:`Outcome` per VM, a :class:`Report` for many,
and :func:`failure`, the one place where an exception becomes a VM's failed outcome."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..engine.actions import Action
from ..engine.executor import Result
from ..errors import NoSuchProcessError, NsmountError, from_oserror
from ..model.namespace import Drift
from ..state.target import Target


@dataclass
class Outcome:
    """What happened to one VM."""

    pid: int
    name: str | None
    source: str
    status: str = "ok"  # ok | repaired | failed | would-repair
    drifts: list[Drift] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    error_code: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        actions = [a.to_dict() for a in self.actions]
        done = {id(a): d for a, d in zip(self.actions, actions, strict=True)}
        d: dict[str, Any] = {
            "pid": self.pid, "name": self.name, "source": self.source, "status": self.status,
            "drift": [x.to_dict() for x in self.drifts],
            "actions": actions,
            # a result repeats its action: each action is put in dict form once
            "results": [r.to_dict(done.get(id(r.action))) for r in self.results],
            "warnings": self.warnings, "seconds": round(self.seconds, 6),
        }
        if self.error:
            d["error"] = self.error
        d.update(self.extra)
        return d


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, int]:
        return summarize(o.status for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return report_dict([o.to_dict() for o in self.outcomes], self.seconds)


def summarize(statuses: Iterable[str]) -> dict[str, int]:
    """A report's ``summary``: how many VMs ended in each status, and in all."""
    s = {"total": 0, "ok": 0, "repaired": 0, "failed": 0, "would-repair": 0}
    for st in statuses:
        s[st] = s.get(st, 0) + 1
        s["total"] += 1
    return s


def report_dict(vms: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """:meth:`Report.to_dict` of outcomes already in their dict form (the service's
    workers send them so: a dict of plain values crosses a pipe for less than the
    objects would, and the service answers with it as it is)."""
    return {"summary": summarize(str(o.get("status")) for o in vms),
            "seconds": round(seconds, 4), "vms": vms}


def failure(out: Outcome, exc: BaseException, target: Target | None = None) -> Outcome:
    """Turn an exception into this VM's failed outcome (the one place that does)."""
    out.status = "failed"
    if isinstance(exc, OSError) and exc.errno == errno.ESRCH:
        exc = NoSuchProcessError(f"pid {out.pid} exited during the run")
    if isinstance(exc, NsmountError):
        out.error, out.error_code = exc.oneline(), exc.exit_code
    elif isinstance(exc, OSError):
        err = from_oserror(exc, "system error")
        out.error, out.error_code = err.oneline(), 2
    else:
        out.error, out.error_code = str(exc), 2
    if target is not None:
        try:
            target.check_alive()
        except NoSuchProcessError as gone:
            out.error, out.error_code = gone.oneline(), gone.exit_code
    return out
