"""When the service answers a hook's ``started`` from its own earlier check of the VM
(Service.fresh_check), and when a uevent's node counts as unchanged (no root needed,
no clock assertions: times are set by hand)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nsmount.faces.reconnect import Candidate
from nsmount.faces.service import config
from nsmount.faces.service.lifecycle import Vm
from nsmount.faces.service.protocol import Request, parse_request
from nsmount.faces.service.serve import FRESH, Service, host_node


def _vm(clean_from: float | None, event_at: float = 0.0) -> Vm:
    vm = Vm(cand=Candidate(4242, "libvirt", "web1"), pidfd=-1, starttime=1)
    vm.clean_from, vm.event_at = clean_from, event_at
    return vm


def _req(op: str = "started", **kw: object) -> Request:
    return parse_request(json.dumps({"v": 1, "op": op, "domain": "web1", **kw}).encode())


def test_fresh_check() -> None:
    svc = Service(config.parse(""))
    try:
        now = time.monotonic()
        fresh = _vm(now - 0.3)
        assert svc.fresh_check(fresh, _req()) is not None
        # only 'started', only without a domain XML (the hook's shell path)
        assert svc.fresh_check(fresh, _req("reconnect")) is None
        assert svc.fresh_check(fresh, _req(xml="<domain/>")) is None
        assert svc.fresh_check(None, _req()) is None
        # never checked, the last run failed, too old
        assert svc.fresh_check(_vm(None), _req()) is None
        assert svc.fresh_check(_vm(now - FRESH - 1), _req()) is None
        # an event for the VM after that run began, or one pending
        assert svc.fresh_check(_vm(now - 0.3, event_at=now - 0.1), _req()) is None
        svc.dirty[4242] = now
        assert svc.fresh_check(fresh, _req()) is None
    finally:
        svc.reactor.close()


def test_host_node(tmp_path: Path) -> None:
    p = tmp_path / "node"
    assert host_node(str(p)) is None
    p.write_text("")
    a = host_node(str(p))
    assert a is not None and a == host_node(str(p))
    os.chmod(p, 0o600)
    assert host_node(str(p)) != a


def test_metrics_writes_are_coalesced(tmp_path: Path) -> None:
    """A burst of changes (a libvirt daemon restart's requests) is a few writes of the
    metrics file, not one each; the last change still reaches the file, within
    METRICS_EVERY, and at stop."""
    from nsmount.faces.service.serve import METRICS_EVERY

    path = tmp_path / "m.prom"
    svc = Service(config.parse(""), metrics_file=str(path))
    writes: list[int] = []
    real = svc.metrics.write

    def counted(p: str) -> None:
        writes.append(svc.metrics.repairs)
        real(p)

    svc.metrics.write = counted  # type: ignore[method-assign]
    try:
        for n in range(1, 201):
            svc.metrics.repairs = n
            svc._write_metrics()
        assert writes == [1]  # the first at once, the rest wait for one timer
        svc.reactor.call_later(METRICS_EVERY * 3, svc.reactor.stop)
        svc.reactor.run()
        assert writes == [1, 200]
        assert "nsmount_repairs_total 200" in path.read_text()
        svc.metrics.repairs = 201
        svc.metrics_at = time.monotonic()  # as if it had just been written
        svc._write_metrics()
        assert writes == [1, 200]  # it waits...
    finally:
        svc.close()  # ...and stopping writes it
    assert writes == [1, 200, 201] and "nsmount_repairs_total 201" in path.read_text()
