"""Counters of the service, written as Prometheus text (node_exporter's textfile
collector) atomically: a temporary file in the same directory, then rename."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

#: event-to-repaired latency buckets, seconds
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    started: float = field(default_factory=time.time)
    vms: int = 0
    drift: int = 0
    repairs: int = 0
    failures: int = 0
    batches: int = 0
    vm_exits: int = 0
    events: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    latency_sum: float = 0.0
    latency_n: int = 0

    def event(self, kind: str) -> None:
        self.events[kind] = self.events.get(kind, 0) + 1

    def request(self, op: str) -> None:
        self.requests[op] = self.requests.get(op, 0) + 1

    def latency(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_n += 1
        for i, b in enumerate(BUCKETS):
            if seconds <= b:
                self.latency_counts[i] += 1

    def render(self) -> str:
        out = [
            "# HELP nsmount_vms_managed VMs the service tracks.",
            "# TYPE nsmount_vms_managed gauge",
            f"nsmount_vms_managed {self.vms}",
            "# HELP nsmount_drift_found_total Drift items found in VMs.",
            "# TYPE nsmount_drift_found_total counter",
            f"nsmount_drift_found_total {self.drift}",
            "# HELP nsmount_repairs_total VM repairs that changed something.",
            "# TYPE nsmount_repairs_total counter",
            f"nsmount_repairs_total {self.repairs}",
            "# HELP nsmount_failures_total Per-VM runs that failed.",
            "# TYPE nsmount_failures_total counter",
            f"nsmount_failures_total {self.failures}",
            "# HELP nsmount_batches_total Batches of per-VM work run.",
            "# TYPE nsmount_batches_total counter",
            f"nsmount_batches_total {self.batches}",
            "# HELP nsmount_vm_exits_total VMs seen exiting (record and lock dropped).",
            "# TYPE nsmount_vm_exits_total counter",
            f"nsmount_vm_exits_total {self.vm_exits}",
            "# HELP nsmount_events_total Host events received, by kind.",
            "# TYPE nsmount_events_total counter",
        ]
        out += [f'nsmount_events_total{{kind="{k}"}} {v}' for k, v in sorted(self.events.items())]
        out += ["# HELP nsmount_requests_total Socket requests, by op.",
                "# TYPE nsmount_requests_total counter"]
        out += [f'nsmount_requests_total{{op="{k}"}} {v}'
                for k, v in sorted(self.requests.items())]
        out += ["# HELP nsmount_event_to_repaired_seconds From a host event to the VMs "
                "it concerned being repaired.",
                "# TYPE nsmount_event_to_repaired_seconds histogram"]
        out += [f'nsmount_event_to_repaired_seconds_bucket{{le="{b:g}"}} {c}'
                for b, c in zip(BUCKETS, self.latency_counts, strict=True)]
        out += [f'nsmount_event_to_repaired_seconds_bucket{{le="+Inf"}} {self.latency_n}',
                f"nsmount_event_to_repaired_seconds_sum {self.latency_sum:.6f}",
                f"nsmount_event_to_repaired_seconds_count {self.latency_n}",
                "# HELP nsmount_start_time_seconds When the service started.",
                "# TYPE nsmount_start_time_seconds gauge",
                f"nsmount_start_time_seconds {self.started:.3f}"]
        return "\n".join(out) + "\n"

    def write(self, path: str) -> None:
        d, base = os.path.split(path)
        tmp = os.path.join(d or ".", f".{base}.tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            with open(fd, "w", closefd=True) as fh:
                fh.write(self.render())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
