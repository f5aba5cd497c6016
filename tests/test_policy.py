"""Unit tests for the device policy parser and its decisions (no root needed)."""

from __future__ import annotations

import os

import pytest

from nsmount.faces.service import config
from nsmount.model.policy import Policy, PolicyError, glob_match, parse

GOOD = """\
# comment
[[allow]]
users = ["alice", 1001]
groups = ["vmusers", "77"]
devices = ["/dev/loop[0-9]*"]
access = "rw"

[[allow]]
users = ["bob"]
devices = ["/dev/disk/by-id/usb-*", "/dev/sr0"]
access = "ro"
"""


def ask(p: Policy, path: str, *, uid: int = 1000, user: str | None = "alice",
        gids: frozenset[int] = frozenset(), groups: frozenset[str] = frozenset(),
        write: bool = True) -> tuple[bool, str]:
    d = p.decide(uid=uid, user=user, gids=gids, groups=groups, path=path, write=write)
    return d.granted, d.reason


def test_parse_and_decide() -> None:
    p = parse(GOOD, "/etc/nsmount/policy.toml")
    assert [r.line for r in p.rules] == [2, 8]
    assert p.rules[0].users == ("alice", 1001) and p.rules[0].groups == ("vmusers", 77)
    assert p.grants_anything
    assert ask(p, "/dev/loop3")[0]
    assert ask(p, "/dev/loop3", uid=1001, user=None)[0]
    assert ask(p, "/dev/loop3", uid=5, user="eve", groups=frozenset({"vmusers"}))[0]
    assert ask(p, "/dev/loop3", uid=5, user="eve", gids=frozenset({77}))[0]
    ok, why = ask(p, "/dev/loop3", uid=5, user="eve")
    assert not ok and "/etc/nsmount/policy.toml" in why and "uid 5 (eve)" in why
    ok, why = ask(p, "/dev/vda")
    assert not ok and "nothing matching /dev/vda" in why
    assert not ask(p, "/dev/loop-control")[0]  # [0-9] after "loop"
    # ro rule: read-only granted, read-write refused with the reason
    assert ask(p, "/dev/sr0", user="bob", write=False)[0]
    ok, why = ask(p, "/dev/sr0", user="bob")
    assert not ok and "read-only" in why
    # the path as asked is what the policy names (a symlink there is followed later)
    assert ask(p, "/dev/disk/by-id/usb-X", user="bob", write=False)[0]
    assert not ask(p, "/dev/disk/by-id/whatever")[0]


def test_glob_never_crosses_slash() -> None:
    assert glob_match("/dev/*", "/dev/sda")
    assert not glob_match("/dev/*", "/dev/disk/by-id/x")
    assert not glob_match("/dev/loop*", "/dev/loop0/x")
    assert glob_match("/dev/disk/*/usb-?", "/dev/disk/by-id/usb-1")
    p = parse('[[allow]]\nusers=[0]\ndevices=["/dev/*"]\n')
    assert not ask(p, "/dev/disk/by-id/x", uid=0, user="root")[0]


def test_empty_and_missing(tmp_path: os.PathLike[str]) -> None:
    assert not parse("").grants_anything
    assert not ask(parse(""), "/dev/loop0")[0]
    p = config.load_policy(os.path.join(tmp_path, "absent.toml"))
    assert p.path is None and not p.rules
    ok, why = ask(p, "/dev/loop0")
    assert not ok and "no policy file" in why


@pytest.mark.parametrize("text,line,words", [
    ("[[allow]\n", 1, "Expected"),
    ("allow = 3\n", 1, "array of tables"),
    ("foo = 1\n", 1, "unknown key"),
    ("[[allow]]\nusers=['a']\ndevices=['/dev/x']\n\n[[allow]]\nusers=['a']\n"
     "devices=['/etc/shadow']\n", 5, "under /dev"),
    ("[[allow]]\nusers=['a']\ndevices=['/dev/../etc/shadow']\n", 1, ".."),
    ("[[allow]]\nusers=['a']\ndevices=['dev/x']\n", 1, "not absolute"),
    ("[[allow]]\nusers=['a']\ndevices=[]\n", 1, "devices"),
    ("[[allow]]\nusers=['a']\ndevices='/dev/x'\n", 1, "devices"),
    ("[[allow]]\ndevices=['/dev/x']\n", 1, "names no one"),
    ("[[allow]]\nusers=['a;rm -rf /']\ndevices=['/dev/x']\n", 1, "not a valid name"),
    ("[[allow]]\nusers=[true]\ndevices=['/dev/x']\n", 1, "neither"),
    ("[[allow]]\nusers=[-1]\ndevices=['/dev/x']\n", 1, "out of range"),
    ("[[allow]]\nusers=['99999999999']\ndevices=['/dev/x']\n", 1, "out of range"),
    ("[[allow]]\nusers=['a']\ndevices=['/dev/x']\naccess='all'\n", 1, "access"),
    ("[[allow]]\nusers=['a']\ndevices=['/dev/x']\nextra=1\n", 1, "unknown key"),
    ("[[allow]]\nusers=['a']\ndevices=[\"/dev/x\\u0001y\"]\n", 1, "printable"),
    ("[[allow]]\nusers=['a']\ndevices=['/dev/" + "x" * 5000 + "']\n", 1, "4096"),
])
def test_bad_policies(text: str, line: int, words: str) -> None:
    with pytest.raises(PolicyError) as ei:
        parse(text, "/etc/p.toml")
    msg = ei.value.oneline()
    assert msg.startswith(f"/etc/p.toml:{line}:"), msg
    assert words in msg and "\n" not in msg, msg


def test_hostile_sizes(tmp_path: os.PathLike[str]) -> None:
    many = "".join("[[allow]]\nusers=[1]\ndevices=['/dev/x']\n" for _ in range(4097))
    with pytest.raises(PolicyError, match="more than 4096 rules"):
        parse(many, "p")
    big = os.path.join(tmp_path, "big.toml")
    with open(big, "w") as fh:
        fh.write("#" * (2 << 20))
    with pytest.raises(PolicyError):
        config.load_policy(big)
    link = os.path.join(tmp_path, "link.toml")
    os.symlink(big, link)
    with pytest.raises(PolicyError, match="symlink"):
        config.load_policy(link)
    fifo = os.path.join(tmp_path, "fifo.toml")
    os.mkfifo(fifo)
    with pytest.raises(PolicyError):
        config.load_policy(fifo)  # never blocks on a FIFO


def test_config_policy_key() -> None:
    cfg = config.parse('policy = "/srv/p.toml"\n', "c")
    assert cfg.policy == "/srv/p.toml"
    assert config.policy_path(cfg) == "/srv/p.toml"
    assert config.policy_path(cfg, "/x.toml") == "/x.toml"
    assert config.policy_path(config.Config()) == "/etc/nsmount/policy.toml"


def test_names_resolved_once_at_load() -> None:
    """The service resolves the policy's names to ids when it loads it (no name-service
    call per request): the resolved policy decides on ids alone, a name that does not
    resolve grants nothing and is noted with its file and line."""
    p = parse(GOOD, "/etc/nsmount/policy.toml")
    users = {"alice": 2001}
    groups = {"vmusers": 3001}
    r, notes = p.resolved(users.get, groups.get)
    assert r.rules[0].users == (2001, 1001) and r.rules[0].groups == (3001, 77)
    assert r.rules[1].users == () and r.rules[1].groups == ()
    assert notes == ["/etc/nsmount/policy.toml:8: no user 'bob'; it is granted nothing"]
    # no names asked for: ids are what the kernel tells about the peer
    assert ask(r, "/dev/loop3", uid=2001, user=None)[0]
    assert ask(r, "/dev/loop3", uid=5, user=None, gids=frozenset({3001}))[0]
    assert not ask(r, "/dev/loop3", uid=5, user="alice")[0]  # a name no longer counts
    assert not ask(r, "/dev/sr0", uid=5, user="bob", write=False)[0]
    assert r.grants_anything
    only_bob, _ = parse('[[allow]]\nusers = ["bob"]\ndevices = ["/dev/sr0"]\n').resolved(
        users.get, groups.get)
    assert not only_bob.grants_anything  # the socket stays root's


def test_the_service_loads_names_as_ids(tmp_path: object) -> None:
    """DeviceGate.load resolves with the machine's user and group databases."""
    from pathlib import Path

    from nsmount.faces.service.devgate import DeviceGate

    f = Path(str(tmp_path)) / "policy.toml"
    f.write_text('[[allow]]\nusers = ["root", "no-such-user-here"]\ngroups = ["root"]\n'
                 'devices = ["/dev/null"]\n')
    gate = DeviceGate(str(f))
    gate.load(strict=True)
    assert gate.policy.rules[0].users == (0,) and gate.policy.rules[0].groups == (0,)
