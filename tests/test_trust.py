"""Building blocks of the trust model (docs/security.rst), tested without a VM: state
files that are not small regular files, escaping of names a VM chose, fd-only attribute
changes, the long-path resolver, the ELF loader lookup and the per-item deadline of the
worker pool.  The hostile end-to-end cases are in integration/test_hostile*.py."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path

import pytest

from nsmount.errors import CommandNotFoundError, SpecError
from nsmount.kernel import fsops, syscalls
from nsmount.model import elf
from nsmount.state import record
from nsmount.model.display import escape_name, safe_line
from nsmount.model.spec import VmSpec
from nsmount.state.files import StateFileError, read_state_file, read_state_text
from nsmount.pipeline.workers import run_all, run_one


# ------------------------------------------------------------------ state files
def test_state_file_refuses_fifo_symlink_dir_and_oversize(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    ok = tmp_path / "ok"
    ok.write_bytes(b"12\n")
    t0 = time.monotonic()
    for path, why in ((fifo, "FIFO"), (link, "symlink"), (tmp_path, "directory"),
                      (big, "too large"), (Path("/dev/zero"), "character device")):
        with pytest.raises(StateFileError, match=why):
            read_state_file(str(path), limit=100)
    assert time.monotonic() - t0 < 5  # the FIFO was never waited on
    assert read_state_file(str(ok), limit=100) == b"12\n"
    with pytest.raises(FileNotFoundError):
        read_state_file(str(tmp_path / "absent"), limit=100)


def test_state_text_decode_error_is_a_state_file_error(tmp_path: Path) -> None:
    p = tmp_path / "x.xml"
    p.write_bytes("<domain/>".encode("utf-16"))
    with pytest.raises(StateFileError, match="not UTF-8"):
        read_state_text(str(p), limit=1000)
    assert issubclass(StateFileError, SpecError)


def test_record_file_name_and_content_must_agree(tmp_path: Path) -> None:
    sdir = str(tmp_path)
    rec = record.Record(57, 1234, VmSpec(name="a", source="record"), (), (1, 2), 99)
    record.write(rec, sdir)
    assert record.read(57, sdir) == rec
    os.rename(tmp_path / "vms" / "57.json", tmp_path / "vms" / "1.json")
    with pytest.raises(SpecError, match="names pid 57, not 1"):
        record.read(1, sdir)
    (tmp_path / "vms" / "2.json").write_text("{not json")
    os.symlink("/dev/zero", tmp_path / "vms" / "3.json")
    scanned = dict(record.scan(sdir))
    assert set(scanned) == {1, 2, 3}
    assert all(isinstance(v, SpecError) for v in scanned.values()), scanned


# ------------------------------------------------------------------ output
def test_names_are_escaped_and_json_is_lossless() -> None:
    raw = b"bad\377na me\n\x1b[31m"
    name = os.fsdecode(raw)
    esc = escape_name(name)
    assert "\n" not in esc and "\x1b" not in esc and " " not in esc
    assert esc == "bad\\377na\\040me\\012\\033[31m"
    line = safe_line(f"drift: {name}")
    assert "\n" not in line and line.startswith("drift: bad\\377na me")
    line.encode("utf-8")  # never raises
    back = json.loads(json.dumps({"p": name}))["p"]
    assert os.fsencode(back) == raw
    assert safe_line("plain ascii") == "plain ascii"
    assert escape_name("/dev/é") == "/dev/é"


# ------------------------------------------------------------------ fd-only ops
def test_chmod_and_xattr_through_the_fd_not_a_path(tmp_path: Path) -> None:
    f = tmp_path / "node"
    f.write_text("")
    os.chmod(f, 0o600)
    fd = os.open(f, os.O_PATH | os.O_NOFOLLOW)
    try:
        fsops.chmod_fd(fd, 0o640)
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o640
        try:
            fsops.setxattr_fd(fd, "user.nsmount", b"v")
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                raise
            pytest.skip(f"no user xattrs here: {exc}")
        assert os.getxattr(f, "user.nsmount") == b"v"
    finally:
        os.close(fd)


def test_long_paths_are_resolved_in_pieces(tmp_path: Path) -> None:
    base = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    comps = [f"{i:03d}" + "d" * 200 for i in range(25)]  # ~5 KiB: over PATH_MAX
    cur = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for c in comps:
        os.mkdir(c, dir_fd=cur)
        nxt = os.open(c, os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
        os.close(cur)
        cur = nxt
    os.close(cur)
    rel = "/".join(comps)
    assert len(rel) > 4096
    with pytest.raises(OSError) as info:
        syscalls.openat2(base, rel, os.O_PATH, fsops.SAFE_RESOLVE)
    assert info.value.errno == errno.ENAMETOOLONG
    fd = fsops.open_dir(base, rel)
    os.close(fd)
    fd, created = fsops.ensure_dirs(base, rel + "/new/leaf")
    assert created == [rel + "/new", rel + "/new/leaf"]
    os.close(fd)
    # a symlink anywhere on the long way is still refused
    os.symlink("/etc", "link", dir_fd=fsops.open_dir(base, "/".join(comps[:20])))
    with pytest.raises(OSError) as info:
        fsops.open_dir(base, "/".join(comps[:20]) + "/link/" + "x" * 10)
    assert info.value.errno == errno.ELOOP
    os.close(base)


def test_long_leaf_names_fit_name_max(tmp_path: Path) -> None:
    pfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    name = "n" * 255
    assert fsops.symlink_at(pfd, name, "../../sda")
    assert os.readlink(tmp_path / name) == "../../sda"
    os.close(pfd)


# ------------------------------------------------------------------ run-in
def test_elf_interpreter() -> None:
    with open("/bin/true", "rb") as fh:
        interp = elf.interpreter(fh.read(1 << 16))
    assert interp is not None and "ld-linux" in interp
    with pytest.raises(CommandNotFoundError, match="not an ELF"):
        elf.interpreter(b"#!/bin/sh\necho hi\n")
    with pytest.raises(CommandNotFoundError):
        elf.interpreter(b"\x7fELF\x02\x01" + b"\0" * 10)


# ------------------------------------------------------------------ deadlines
def _work(x: int) -> int:
    if x == 3:
        time.sleep(60)  # a VM that blocks (an unanswered FUSE mount, a frozen process)
    if x == 5:
        raise SpecError("bad spec")
    if x == 7:
        os._exit(3)  # a worker that dies
    return x * 10


def test_one_blocking_item_never_stops_the_others() -> None:
    got: dict[int, object] = {}
    t0 = time.monotonic()
    run_all(list(range(10)), _work, workers=2, timeout=1.0,
            on_result=lambda i, v: got.__setitem__(i, v),
            on_error=lambda i, e: got.__setitem__(i, f"error {e}"),
            on_lost=lambda i, why: got.__setitem__(i, f"lost {why}"))
    assert time.monotonic() - t0 < 10
    assert sorted(got) == list(range(10))
    assert str(got[3]).startswith("lost timed out after 1s")
    assert got[5] == "error bad spec"
    assert str(got[7]).startswith("lost its worker process died")
    assert all(got[i] == i * 10 for i in (0, 1, 2, 4, 6, 8, 9))


def test_run_one_raises_deadline_and_propagates_errors() -> None:
    from nsmount.errors import DeadlineError

    assert run_one(lambda: 42, timeout=5) == 42
    with pytest.raises(DeadlineError, match="timed out"):
        run_one(lambda: time.sleep(30), timeout=0.5)
    with pytest.raises(SpecError, match="bad spec"):
        run_one(lambda: _work(5), timeout=5)
