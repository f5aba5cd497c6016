"""Crash injection: every apply step, killed right after it, then a clean rerun converges.

The step list comes from the code (``nsmount.engine.actions.STEPS``), so a new step is covered
automatically, and a step no scenario plans makes ``test_every_step_is_reachable``
fail, naming it (coverage cannot shrink silently).

Scenarios (each in its own sandbox; every (scenario, step) pair gets a fresh VM):

* ``launch``    ``nsmount exec`` of a spec with a nested node (/dev/net/tun), a by-id
                symlink chain and hugepages, hugetlbfs mounted on the host first;
* ``repair``    ``nsmount repair`` of a VM damaged every way a plan can fix (node
                removed, chmod, dir removed, symlink removed, /dev/shm unmounted,
                hugetlbfs made private, per-domain hugepage dir removed);
* ``reconnect`` ``nsmount reconnect`` after a hugetlbfs is mounted on the host late;
* ``rebuild``   ``nsmount repair --rebuild-dev`` (SwapDev);
* ``remove``    ``nsmount device remove`` (RemoveEntry).

For each step the scenario's dry run plans: run with ``NSMOUNT_CRASH_AFTER=<Step>``,
assert death by SIGKILL (-9), rerun without it (exit 0/1), then assert convergence:
``repair`` and ``reconnect`` of the VM both find nothing to do (exit 0), the nodes are
right, no mount point is stacked in the VM, and the sandbox host's mountinfo is
unchanged except the hugetlbfs mounted on purpose.  The scenario driver is
integration/scenarios/crash.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from harness import in_sandbox, privileged
from scenarios import crash

from nsmount.engine.actions import STEPS

pytestmark = privileged

SCENARIOS = crash.SCENARIOS


def _run(scenario: str, only_plan: bool = False) -> dict[str, Any]:
    res = in_sandbox(crash.crash_scenario, scenario, [s.__name__ for s in STEPS], only_plan,
                     check=False, timeout=170)
    assert res.returncode == 0, res.describe()
    return res.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crash_and_converge(scenario: str) -> None:
    out = _run(scenario)
    assert out["runs"], f"{scenario}: no step planned: {out}"
    bad = {step: errs for step, errs in out["runs"].items() if errs}
    assert not bad, json.dumps(bad, indent=1)


def test_every_step_is_reachable() -> None:
    """Every step of nsmount.engine.actions.STEPS is planned by at least one scenario."""
    planned: set[str] = set()
    for scenario in SCENARIOS:
        planned |= set(_run(scenario, only_plan=True)["planned"])
    # the rootless launch's steps are crash-tested by integration/test_rootless.py
    from test_rootless import rootless_planned_steps

    planned |= rootless_planned_steps()
    missing = sorted(s.__name__ for s in STEPS if s.__name__ not in planned)
    assert not missing, (f"steps no scenario (launch/repair/reconnect/rebuild/remove, "
                         f"rootless) applies, so crash injection cannot cover them: {missing}")
