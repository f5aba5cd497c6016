"""What the pipeline reports: one :class:`Outcome` per VM, a :class:`Report` for many,
and :func:`failure`, the one place where an exception becomes a VM's failed outcome."""

from __future__ import annotations

import errno
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
        d: dict[str, Any] = {
            "pid": self.pid, "name": self.name, "source": self.source, "status": self.status,
            "drift": [x.to_dict() for x in self.drifts],
            "actions": [a.to_dict() for a in self.actions],
            "results": [r.to_dict() for r in self.results],
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
        s = {"total": len(self.outcomes), "ok": 0, "repaired": 0, "failed": 0,
             "would-repair": 0}
        for o in self.outcomes:
            s[o.status] = s.get(o.status, 0) + 1
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "seconds": round(self.seconds, 4),
                "vms": [o.to_dict() for o in self.outcomes]}


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
