"""The public library API (issue 9): each function called twice returns typed results;
bad input and vanished VMs raise NsmountError (never a raw TypeError, AttributeError or
OSError); a VM that exits is not a failure for reconnect; ``Launched`` works as a
context manager with poll/send_signal/wait.  Scenario: integration/scenarios/api.py."""

from __future__ import annotations

from harness import in_sandbox, privileged
from scenarios.api import api_twice

pytestmark = privileged


def test_public_api_twice_typed_and_safe() -> None:
    o = in_sandbox(api_twice, timeout=170).json()
    for i in range(2):
        assert o["seen"][f"inspect{i}"] == ["Outcome", "would-repair" if i == 0 else "ok",
                                            True] or o["seen"][f"inspect{i}"][0] == "Outcome"
        assert o["seen"][f"repair{i}"][0] == "Outcome"
        assert o["seen"][f"add{i}"] == ["Outcome", "repaired"], o["seen"]
        assert o["seen"][f"remove{i}"] == ["Outcome", "repaired"], o["seen"]
        assert o["seen"][f"reconnect{i}"] == ["Report", 0, True], o["seen"]
    assert o["seen"]["repair1"] == ["Outcome", "ok"], o["seen"]  # converged
    assert o["seen"]["add_inproc"] == ["Outcome", "repaired"], o["seen"]
    assert o["seen"]["remove_inproc"] == ["Outcome", "repaired"], o["seen"]
    assert not [k for k, v in o["errors"].items() if v.startswith(("RAW", "no error"))], \
        o["errors"]
    assert o["errors"]["no-such-pid"] == "NoSuchProcessError"
    assert o["gone"] == "NoSuchProcessError", o
    assert o["after_exit"]["failed"] == 0, o
    running, code, pidfd = o["launched"]
    assert running is None and code == -15 and pidfd == -1, o["launched"]
