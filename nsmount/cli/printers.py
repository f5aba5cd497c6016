"""Printers of the command-line front end: text (plain, tree) and ``--json``.

The only module (with :mod:`nsmount.cli.main`) that writes to stdout.  Every text line goes
through :class:`Out`, which passes it through :func:`~nsmount.model.display.safe_line`
and ends quietly when stdout is closed (``nsmount inspect X | head -1``); every name a
VM supplied (paths in its ``/dev``, symlink targets, mount points, its domain name) is
escaped with :func:`~nsmount.model.display.escape_name` first.  JSON output is ASCII
(``json.dumps`` with ``ensure_ascii``), so it carries such names losslessly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..model.display import escape_name, safe_line

#: format version of every ``--json`` document (docs/nsmount-output.schema.json)
JSON_VERSION = 1


class Out:
    """stdout for one command: safe lines, JSON, and a quiet end on a closed pipe."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.closed = False

    @property
    def unicode(self) -> bool:
        """Can stdout take the tree's box-drawing characters?"""
        enc = (getattr(sys.stdout, "encoding", None) or "ascii").lower().replace("-", "")
        return enc in ("utf8", "utf16", "utf32")

    def _write(self, text: str) -> None:
        if self.closed:
            return
        try:
            try:
                sys.stdout.write(text)
            except UnicodeEncodeError:  # a stdout that cannot take it: escape, never fail
                enc = getattr(sys.stdout, "encoding", None) or "ascii"
                sys.stdout.write(text.encode(enc, "backslashreplace").decode(enc))
            sys.stdout.flush()
        except BrokenPipeError:
            self.close_quietly()

    def close_quietly(self) -> None:
        """The reader went away: stop writing; later flushes (at exit) go nowhere."""
        self.closed = True
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
            os.close(fd)
        except (OSError, ValueError):
            pass

    def line(self, text: object = "") -> None:
        """One line of text (a report line: suppressed by ``-q``)."""
        if not self.quiet:
            self._write(safe_line(text) + "\n")

    def data(self, text: object = "") -> None:
        """One line the user asked for explicitly (inspect, man, completion): never
        suppressed."""
        self._write(safe_line(text) + "\n")

    def raw(self, text: str) -> None:
        """Generated text of our own (man page, completion script), unchanged."""
        self._write(text)

    def json(self, doc: Mapping[str, Any]) -> None:
        self._write(json.dumps({"version": JSON_VERSION, **doc}, indent=1, default=str) + "\n")


def who(name: str | None, pid: int) -> str:
    if pid <= 0:
        return escape_name(name or "?")
    return f"{escape_name(name)} (pid {pid})" if name else f"pid {pid}"


# ------------------------------------------------------------- one outcome
def outcome(out: Out, o: Any, *, verb: str) -> None:
    """The one text printer of a per-VM :class:`~nsmount.pipeline.session.Outcome`."""
    out.line(f"{who(o.name, o.pid)}: spec from {o.source}")
    for w in o.warnings:
        out.line(f"  warning: {w}")
    for d in o.drifts:
        out.line(f"  drift: {drift(d)}")
    if o.results:
        for r in o.results:
            mark = "ok  " if r.ok else "FAIL"
            tail = f" ({r.error})" if r.error else (f" ({r.note})" if r.note else "")
            out.line(f"  {mark} {r.action.describe()}{tail}")
    elif o.actions:
        out.line(f"  would {verb}:" if o.status == "would-repair" else "  plan:")
        for a in o.actions:
            out.line(f"    - {a.describe()}")
    if o.error and not o.results:
        out.line(f"  error: {o.error}")
    out.line(f"  status: {o.status}")


def drift(d: Any) -> str:
    return f"{d.kind}: {escape_name(d.path)}: {d.detail}"


def plan(out: Out, actions: Sequence[Any], header: str) -> None:
    out.line(header)
    for i, a in enumerate(actions, 1):
        why = f"   # {a.reason}" if a.reason else ""
        out.line(f"  {i:3}. {a.describe()}{why}")


# ------------------------------------------------------------- inspect
#: ``inspect -o`` columns of the mount tree (findmnt's names where they exist)
MOUNT_COLUMNS: dict[str, str] = {
    "TARGET": "mount point (as a tree)",
    "SOURCE": "mount source",
    "FSTYPE": "filesystem type",
    "PROPAGATION": "shared/slave/private, with peer group and master",
    "OPTIONS": "per-mount options",
    "FS-OPTIONS": "superblock options",
    "FSROOT": "root of the mount within its filesystem",
    "MAJ:MIN": "device number",
    "ID": "mount id",
    "PARENT": "parent mount id",
}
DEFAULT_MOUNT_COLUMNS = ("TARGET", "SOURCE", "FSTYPE", "PROPAGATION")
DEV_COLUMNS = ("PATH", "TYPE", "MAJ:MIN", "MODE", "OWNER", "TARGET")

def _prop(m: Mapping[str, Any]) -> str:
    p = str(m.get("propagation") or "")
    if m.get("peer_group"):
        p += f",peer:{m['peer_group']}"
    if m.get("master"):
        p += f",master:{m['master']}"
    return p


def _cell(m: Mapping[str, Any], col: str) -> str:
    if col == "SOURCE":
        return escape_name(m.get("source", ""))
    if col == "FSTYPE":
        return escape_name(m.get("fstype", ""))
    if col == "PROPAGATION":
        return _prop(m)
    if col == "OPTIONS":
        return escape_name(m.get("options", ""))
    if col == "FS-OPTIONS":
        return escape_name(m.get("super_options", ""))
    if col == "FSROOT":
        return escape_name(m.get("root", ""))
    if col == "MAJ:MIN":
        return str(m.get("dev", ""))
    if col == "ID":
        return str(m.get("id", ""))
    if col == "PARENT":
        return str(m.get("parent", ""))
    raise KeyError(col)


def mount_tree_rows(mounts: Sequence[Mapping[str, Any]], *, ascii: bool = False
                    ) -> list[tuple[str, Mapping[str, Any]]]:
    """(tree prefix + escaped target, mount) in findmnt's order: children under their
    parent, in mount order (``ascii``: ``|-`` instead of box drawing, like
    ``findmnt --ascii``)."""
    mid, last_, bar = ("|-", "`-", "| ") if ascii else ("├─", "└─", "│ ")
    ids = {m["id"] for m in mounts}
    kids: dict[object, list[Mapping[str, Any]]] = {}
    roots: list[Mapping[str, Any]] = []
    for m in mounts:
        if m.get("parent") in ids and m["parent"] != m["id"]:
            kids.setdefault(m["parent"], []).append(m)
        else:
            roots.append(m)
    rows: list[tuple[str, Mapping[str, Any]]] = []
    seen: set[object] = set()

    def walk(m: Mapping[str, Any], lead: str, branch: str) -> None:
        if m["id"] in seen:  # a cycle in a hostile mount table: print once
            return
        seen.add(m["id"])
        rows.append((branch + escape_name(m.get("target", "")), m))
        children = kids.get(m["id"], [])
        for i, c in enumerate(children):
            last = i == len(children) - 1
            walk(c, lead + ("  " if last else bar), lead + (last_ if last else mid))

    for r in roots:
        walk(r, "", "")
    for m in mounts:  # anything unreachable (cycles) still shows up, flat
        if m["id"] not in seen:
            walk(m, "", "")
    return rows


def table(out: Out, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = list(rows)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        parts = [c.ljust(w) for c, w in zip(cells, widths, strict=True)]
        return " ".join(parts).rstrip()

    out.data(fmt(header))
    for r in rows:
        out.data(fmt(r))


def inspect(out: Out, o: Any, columns: Sequence[str]) -> None:
    """``findmnt``-style: the mount tree (with propagation), then ``/dev``, then drift."""
    out.data(f"{who(o.name, o.pid)}: spec from {o.source}")
    out.data()
    mounts = o.extra.get("mounts", [])
    rows = []
    for tgt, m in mount_tree_rows(mounts, ascii=not out.unicode):
        rows.append([tgt if c == "TARGET" else _cell(m, c) for c in columns])
    table(out, list(columns), rows)
    out.data()
    out.data(f"/dev ({escape_name(o.extra.get('dev_fstype') or '?')}):")
    drows = []
    for e in o.extra.get("dev", []):
        kind = "mount" if e.get("mount") else escape_name(e.get("kind", "?"))
        majmin = f"{e['major']}:{e['minor']}" if "major" in e else ""
        mode = f"{int(e['mode']):04o}" if isinstance(e.get("mode"), int) else ""
        owner = f"{e.get('uid', '')}:{e.get('gid', '')}" if "uid" in e else ""
        tgt = f"-> {escape_name(e['target'])}" if e.get("target") else ""
        drows.append([escape_name(e.get("path", "")), kind, majmin, mode, owner, tgt])
    table(out, DEV_COLUMNS, drows)
    out.data()
    out.data("drift:" if o.drifts else "drift: none")
    for d in o.drifts:
        out.data(f"  {drift(d)}")
    for w in o.warnings:
        out.data(f"warning: {w}")


# ------------------------------------------------------------- reconnect
def reconnect(out: Out, rep: Any) -> None:
    for o in rep.outcomes:
        what = o.error if o.status == "failed" else (
            f"{len(o.actions)} action(s)" if o.actions else "nothing to do")
        out.line(f"{o.status:<12} {who(o.name or 'vm', o.pid)}: {what}")
        for w in o.warnings:
            out.line(f"{'':12} warning: {w}")
    s = rep.summary()
    out.line(f"{s['total']} VM(s): {s['ok']} ok, {s['repaired']} repaired, "
             f"{s['would-repair']} would repair, {s['failed']} failed in {rep.seconds:.3f}s")


def progress() -> Any:
    """A stderr progress line for big reconnect runs on a terminal, else None."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, failed: int) -> None:
        if total >= 20 and (done == total or done % 10 == 0):
            sys.stderr.write(f"\rreconnect: {done}/{total} VMs, {failed} failed")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return show


# ------------------------------------------------------------- propagation
def propagation(out: Out, rows: Sequence[Mapping[str, Any]], *, fix: bool,
                dry_run: bool) -> None:
    for r in rows:
        state = r["propagation"] if r["mounted"] else "not a mount point"
        flag = "ok " if r["ok"] else ("-- " if not r["mounted"] else "BAD")
        out.line(f"{flag} {escape_name(r['path']):<30} {state}")
    bad = [r for r in rows if not r["ok"] and r["mounted"]]
    if bad:
        verb = "would run" if dry_run else ("failed" if fix else "fix with")
        out.line(f"{verb}: " + "; ".join(f"mount --make-rshared {escape_name(r['path'])}"
                                         for r in bad)
                 + ("" if fix else "  (or: nsmount propagation --fix)"))


# ------------------------------------------------------------- list
def _when(t: object) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def vm_list(out: Out, origin: str, vms: list[dict[str, Any]]) -> None:
    """``nsmount list``: one line per managed VM."""
    out.data(f"{'PID':>8} {'NAME':<24} {'SOURCE':<15} {'STATUS':<10} {'LAST REPAIR':<19} DRIFT")
    for v in vms:
        drift = v.get("drift")
        shown = "-" if drift is None else (",".join(map(str, drift)) or "none")
        out.data(f"{v.get('pid', '?'):>8} {escape_name(v.get('name') or '-'):<24} "
                        f"{escape_name(v.get('source', '-')):<15} {v.get('status', '?'):<10} "
                        f"{_when(v.get('last_repair')):<19} {escape_name(shown)}")
    out.line(f"{len(vms)} VM(s) (from the {origin})")
