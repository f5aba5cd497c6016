"""The device policy of the service: who may have which host device, ``ro`` or ``rw``.

``/etc/nsmount/policy.toml`` (``policy`` in the host configuration, ``--policy`` on
``nsmount serve``)::

    # the users alice and uid 1001, and every member of the group "vmusers",
    # may have the loop devices read-write
    [[allow]]
    users = ["alice", 1001]
    groups = ["vmusers"]
    devices = ["/dev/loop[0-9]*"]
    access = "rw"

    [[allow]]
    users = ["bob"]
    devices = ["/dev/disk/by-id/usb-*"]
    access = "ro"

A rule matches a peer whose uid (or user name) is in ``users`` or one of whose groups
(primary or supplementary, id or name) is in ``groups``; the service resolves the names
to ids once, when it loads the policy (:meth:`Policy.resolved`).  A device pattern is an
``fnmatch`` glob matched **per path component** (``*`` never crosses a ``/``:
``/dev/*`` does not grant ``/dev/disk/by-id/X``) against the path as asked
(canonical), before anything on the host is looked at (a refused user learns nothing
about which nodes exist); a symlink the host's ``/dev`` has there is then followed as
``nsmount device add`` does (root's ``/dev``, never leaving it).  ``rw`` grants
read-write and read-only, ``ro`` read-only.  Nothing is granted that no rule grants: no file, an
empty file, no matching rule -> refused.

This module is pure (no lookups, no I/O): :func:`parse` turns text into a
:class:`Policy`, :meth:`Policy.decide` answers one question.  Errors are one line naming
the file and the line (:class:`PolicyError`); the service keeps its last good policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

from ..errors import SpecError
from . import tomltext
from .paths import canonical, is_strictly_within

DEFAULT_POLICY = "/etc/nsmount/policy.toml"
MAX_RULES = 4096
MAX_ITEMS = 1024
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
_RULE_KEYS = {"users", "groups", "devices", "access"}
ACCESS = ("ro", "rw")


class PolicyError(SpecError):
    """A bad policy file: ``FILE:LINE: what``."""


@dataclass(frozen=True)
class Rule:
    users: tuple[str | int, ...]
    groups: tuple[str | int, ...]
    devices: tuple[str, ...]
    access: str  # "ro" or "rw"
    line: int = 0

    def who(self, uid: int, user: str | None, gids: frozenset[int],
            groups: frozenset[str]) -> bool:
        return any(u == uid if isinstance(u, int) else u == user for u in self.users) or \
            any(g in gids if isinstance(g, int) else g in groups for g in self.groups)

    def covers(self, path: str) -> bool:
        return any(glob_match(pat, path) for pat in self.devices)


@dataclass(frozen=True)
class Decision:
    granted: bool
    reason: str
    rule: Rule | None = None


@dataclass(frozen=True)
class Policy:
    path: str | None = None
    rules: tuple[Rule, ...] = ()

    @property
    def grants_anything(self) -> bool:
        return any(r.users or r.groups for r in self.rules)

    def resolved(self, user_id: Callable[[str], int | None],
                 group_id: Callable[[str], int | None]) -> tuple[Policy, list[str]]:
        """The policy with every user and group name replaced by its id, as
        ``user_id``/``group_id`` resolve it now (None: no such name), and a note per
        name that resolved to nothing (``FILE:LINE: ...``; such a name grants nothing).

        The service resolves names once, when it loads the policy, so deciding a
        request never asks the name service: an unprivileged peer's first request
        must not make the event loop wait on a slow NSS (LDAP, sssd).  A user or group
        added later counts from the next reload (SIGHUP)."""
        notes: list[str] = []

        def ids(names: tuple[str | int, ...], lookup: Callable[[str], int | None],
                what: str, line: int) -> tuple[str | int, ...]:
            out: list[str | int] = []
            for n in names:
                i = n if isinstance(n, int) else lookup(n)
                if i is None:
                    notes.append(f"{self.path or '<policy>'}:{line}: no {what} {n!r}; it is "
                                 "granted nothing")
                else:
                    out.append(i)
            return tuple(out)

        rules = tuple(replace(r, users=ids(r.users, user_id, "user", r.line),
                              groups=ids(r.groups, group_id, "group", r.line))
                      for r in self.rules)
        return Policy(self.path, rules), notes

    def decide(self, *, uid: int, user: str | None, gids: frozenset[int],
               groups: frozenset[str], path: str, write: bool) -> Decision:
        """May the peer (uid / name, its groups) have ``path`` read-write (``write``)
        or read-only?  The reason names the policy file, so a refused user knows whom
        to ask."""
        where = self.path or "(no policy file)"
        who = f"uid {uid}" + (f" ({user})" if user else "")
        what = path
        ro_only: Rule | None = None
        for r in self.rules:
            if not (r.who(uid, user, gids, groups) and r.covers(path)):
                continue
            if r.access == "rw" or not write:
                return Decision(True, f"{where}:{r.line}: {r.access} for {who}", r)
            ro_only = ro_only or r
        if ro_only is not None:
            return Decision(False, f"the policy {where} grants {who} {what} read-only "
                            f"only (line {ro_only.line}); ask for it read-only")
        return Decision(False, f"the policy {where} grants {who} nothing matching {what}")


def glob_match(pattern: str, path: str) -> bool:
    """fnmatch per path component: ``*``, ``?`` and ``[...]`` never match a ``/``."""
    pp, cp = pattern.split("/"), path.split("/")
    return len(pp) == len(cp) and all(fnmatchcase(c, p) for p, c in zip(pp, cp, strict=True))


def _rule_lines(text: str) -> list[int]:
    return [text.count("\n", 0, m.start()) + 1
            for m in re.finditer(r"^[ \t]*\[\[[ \t]*\"?allow\"?[ \t]*\]\]", text, re.M)]


def parse(text: str, path: str = "<policy>") -> Policy:
    """Policy text -> Policy, or PolicyError ``path:line: what`` (one line)."""
    data = tomltext.loads(text, path, PolicyError)
    unknown = sorted(str(k)[:40] for k in data if k != "allow")
    if unknown:
        raise PolicyError(f"{path}:1: unknown key(s) {', '.join(map(repr, unknown))} "
                          "(expected [[allow]] tables)")
    raw = data.get("allow", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise PolicyError(f"{path}:1: 'allow' must be an array of tables ([[allow]])")
    if len(raw) > MAX_RULES:
        raise PolicyError(f"{path}:1: more than {MAX_RULES} rules")
    lines = _rule_lines(text)
    rules = []
    for i, r in enumerate(raw):
        line = lines[i] if i < len(lines) else 1
        try:
            rules.append(_rule(r, line))
        except ValueError as exc:
            raise PolicyError(f"{path}:{line}: rule {i + 1}: {exc}") from None
    return Policy(path, tuple(rules))


def _rule(r: dict[str, Any], line: int) -> Rule:
    unknown = sorted(str(k)[:40] for k in set(r) - _RULE_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}")
    users = _principals(r.get("users", []), "users")
    groups = _principals(r.get("groups", []), "groups")
    if not users and not groups:
        raise ValueError("names no one: give 'users' and/or 'groups'")
    devs = r.get("devices")
    if not isinstance(devs, list) or not devs or len(devs) > MAX_ITEMS \
            or not all(isinstance(d, str) for d in devs):
        raise ValueError(f"'devices' must be a list of 1 to {MAX_ITEMS} path patterns")
    access = r.get("access", "rw")
    if access not in ACCESS:
        raise ValueError("'access' must be \"ro\" or \"rw\"")
    return Rule(users, groups, tuple(_pattern(d) for d in devs), str(access), line)


def _principals(val: object, key: str) -> tuple[str | int, ...]:
    if not isinstance(val, list) or len(val) > MAX_ITEMS:
        raise ValueError(f"'{key}' must be a list of names or numeric ids")
    out: list[str | int] = []
    for v in val:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"'{key}': {v!r} is neither a name nor a numeric id")
        if isinstance(v, int):
            if not 0 <= v < 2 ** 32 - 1:
                raise ValueError(f"'{key}': id {v} out of range")
        elif v.isdigit():
            if int(v) >= 2 ** 32 - 1:
                raise ValueError(f"'{key}': id {v} out of range")
            v = int(v)
        elif not _NAME.fullmatch(v):
            raise ValueError(f"'{key}': {v[:40]!r} is not a valid name")
        out.append(v)
    return tuple(out)


def _pattern(p: str) -> str:
    if len(p) > 4096 or "\0" in p or not p.isprintable():
        raise ValueError("a device pattern must be printable, at most 4096 characters")
    try:
        c = canonical(p, what="device pattern")
    except SpecError as exc:
        raise ValueError(exc.oneline()) from None
    if c != p.rstrip("/") or not is_strictly_within(c, "/dev"):
        raise ValueError(f"{p[:80]!r} must be a canonical pattern under /dev (no '..', "
                         "no '//')")
    return c

