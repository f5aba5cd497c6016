"""``nsmount serve`` in a sandbox playing a hypervisor host: real processes, real
namespaces, real kernel events (fanotify on the sandbox's mount namespace, the
machine's uevents).

==================  ============================================================
case                what
==================  ============================================================
events_end_to_end   50 VMs started with ``nsmount exec`` while the service runs,
                    before any hugetlbfs exists; mounting hugetlbfs makes it and
                    each per-domain dir visible in all 50 with no command run; an
                    optional device of one VM appears there after its node is made
                    and a real uevent fires; 5 VMs killed leave ``list`` and their
                    records; ``nsmount reconnect`` then exits 0; metrics written;
                    kill -9 of the service (mid-batch), a mount added while it is
                    down, restart: converges, nothing stacked
socket_abuse        malformed, oversized, unknown, wrong-version, wrong-type and
                    unauthorized (uid 65534) requests get clear errors and the
                    service keeps serving; a SIGSTOPped VM times out without
                    blocking a request for another VM; the hook and the one-line
                    socat request go through the service; a bad config on SIGHUP
                    is one line naming file and line, the old config is kept
flapping_mount      hugetlbfs mounted and unmounted 100 times: every VM ends with
                    exactly one visible hugetlbfs there and its per-domain dir
uevent_storm        two storms of 1000 real uevents (``echo change >
                    /sys/block/loop6/uevent``) while the host's node of an optional
                    device appears, goes and comes back with another major:minor:
                    the VMs that name it end with the host's last node, the others
                    without; a handful of batches per storm (not 1000 repairs); then a
                    mount flapping 100 times; the service answers, no traceback, its
                    RSS after the second storm and the flapping within a few MiB of
                    its RSS after the first
==================  ============================================================

The scenario bodies are in integration/scenarios/serve.py and storm.py.
"""

from __future__ import annotations

from harness import ok_json, privileged
from scenarios import serve, storm

pytestmark = privileged


def test_events_end_to_end() -> None:
    ok_json(serve.events_end_to_end, timeout=170)


def test_socket_abuse() -> None:
    ok_json(serve.socket_abuse, timeout=170)


def test_flapping_mount() -> None:
    ok_json(serve.flapping_mount, timeout=170)


def test_uevent_storm() -> None:
    ok_json(storm.uevent_storm, timeout=120)
