"""The command line as scripts and admins use it: real ``python -m nsmount`` processes.

No root needed (nothing here enters a namespace): parsing, usage errors and their exit
code (64), ``--version``, global options on either side of the command, flags a command
cannot honour, typo suggestions, the man page (rendered by ``man``), shell completion
(``complete -p`` after sourcing it), the libvirt hook failing open (interpreter deleted,
package removed, bad XML, other operations), ``uninstall-hook`` undoing
``install-hook`` exactly, the JSON schema naming every action, and printers that never
raise on hostile names.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nsmount import __version__, cli  # noqa: E402
from nsmount.cli import printers as cli_print  # noqa: E402
from nsmount.engine.actions import STEPS, kebab  # noqa: E402

EX_USAGE = 64


def nsm(*args: str, env: dict[str, str] | None = None, input: str | None = None,
        py: str = sys.executable, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO)
    e.update(env or {})
    return subprocess.run([py, "-m", "nsmount", *args], capture_output=True, text=True,
                          env=e, input=input, timeout=60, cwd=cwd)


def usage_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == EX_USAGE, (r.returncode, r.stdout, err)
    assert err.startswith("nsmount: error:") and "\n" not in err, repr(err)
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


def test_version() -> None:
    r = nsm("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"nsmount {__version__}", r
    from importlib.metadata import version

    assert version("nsmount") == __version__  # one version source (pyproject is dynamic)


@pytest.mark.parametrize("argv, words", [
    (["inspct", "1"], ["unknown command 'inspct'", "did you mean 'inspect'"]),
    (["recconect"], ["did you mean 'reconnect'"]),
    (["device", "ad", "1", "/dev/x"], ["did you mean 'add'"]),
    (["repair", "1", "--jsn"], ["--jsn", "did you mean '--json'"]),
    (["reconnect", "--jobs", "-3"], ["--jobs"]),
    (["reconnect", "--jobs", "0"], ["--jobs"]),
    (["reconnect", "--jobs", "many"], ["--jobs"]),
    (["reconnect", "vm1", "--jobs", "2"], ["--jobs"]),
    (["reconnect", "vm1", "--no-scan"], ["--no-scan"]),
    (["run-in", "1", "--json", "--", "ls"], ["--json"]),
    (["run-in", "1", "--spec", "x", "--", "ls"], ["--spec"]),
    (["run-in", "1"], ["no command"]),
    (["exec", "--json", "--", "true"], ["--json needs --dry-run"]),
    (["exec"], ["no command"]),
    (["propagation", "--dry-run"], ["--dry-run goes with --fix"]),
    (["propagation", "--check", "--fix"], ["--fix"]),
    (["inspect", "1", "-o", "TARGET,NOPE"], ["NOPE"]),
    (["inspect", "1", "-o", "TARGET", "--json"], ["-o"]),
    (["repair", "1", "--spec", "a", "--domain-xml", "b"], ["--domain-xml"]),
    (["-q", "-v", "repair", "1"], ["-q and -v"]),
    (["completion", "fish"], ["fish"]),
    ([], ["required"]),
    (["device"], ["required"]),
])
def test_usage_errors_exit_64_with_one_line(argv: list[str], words: list[str]) -> None:
    usage_error(nsm(*argv), *words)


def test_usage_code_differs_from_failure_codes() -> None:
    codes = {code for code, _ in cli.EXIT_CODES}
    assert cli.EX_USAGE == EX_USAGE and EX_USAGE in codes
    assert {0, 1, 2, 14, 64, 66, 130} <= codes


def test_global_options_before_or_after_the_command(tmp_path: Path) -> None:
    """--state-dir / --libvirt-state-dir / -v / -q on either side reach the command:
    a domain name is resolved through the given libvirt state dir."""
    lv = tmp_path / "lv"
    lv.mkdir()
    for argv in (["--libvirt-state-dir", str(lv), "inspect", "dom1"],
                 ["inspect", "dom1", "--libvirt-state-dir", str(lv)],
                 ["-v", "--state-dir", str(tmp_path), "inspect", "--libvirt-state-dir",
                  str(lv), "dom1", "-q"]):
        r = nsm(*argv, env={"NSMOUNT_LIBVIRT_STATE_DIR": "/nonexistent-lv"})
        if argv.count("-q") and argv.count("-v"):
            usage_error(r, "-q and -v")
            continue
        assert r.returncode == 8, (argv, r)
        assert str(lv) in r.stderr and "nonexistent-lv" not in r.stderr, (argv, r.stderr)


def test_missing_input_file_is_not_malformed(tmp_path: Path) -> None:
    r = nsm("exec", "--dry-run", "--spec", str(tmp_path / "nope.toml"), "--", "true")
    assert r.returncode == cli.EX_NOINPUT and "cannot read" in r.stderr, r
    (tmp_path / "bad.toml").write_text("name = [")
    r = nsm("exec", "--dry-run", "--spec", str(tmp_path / "bad.toml"), "--", "true")
    assert r.returncode == 3, r


def test_exec_dry_run_json_has_version_and_kebab_actions() -> None:
    r = nsm("exec", "--dry-run", "--json", "--", "true")
    if r.returncode != 0:
        pytest.skip(f"exec --dry-run needs the host's /dev here: {r.stderr}")
    doc = json.loads(r.stdout)
    assert doc["version"] == 1
    kinds = {kebab(cls.__name__) for cls in STEPS}
    assert doc["actions"] and all(a["action"] in kinds for a in doc["actions"]), doc


def test_man_page_renders(tmp_path: Path) -> None:
    r = nsm("man")
    assert r.returncode == 0 and r.stdout.startswith(".TH NSMOUNT 8"), r.stderr
    page = tmp_path / "nsmount.8"
    page.write_text(r.stdout)
    if shutil.which("man") is None:
        pytest.skip("man not installed")
    shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                           env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"}, timeout=60)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for word in ("EXIT STATUS", "uninstall-hook", "--libvirt-state-dir", "64", "130"):
        assert word in text, word
    assert "warning" not in shown.stderr.lower(), shown.stderr


def test_bash_completion_registers() -> None:
    r = nsm("completion", "bash")
    assert r.returncode == 0 and "nsmount" in r.stdout, r
    sh = subprocess.run(["bash", "-c", 'source /dev/stdin; complete -p nsmount'],
                        input=r.stdout, capture_output=True, text=True, timeout=60)
    assert sh.returncode == 0 and "nsmount" in sh.stdout, sh
    z = nsm("completion", "zsh")
    assert z.returncode == 0 and z.stdout.startswith("#compdef nsmount"), z


def test_closed_stdout_is_quiet() -> None:
    """Unprivileged stand-in for inspect | head -1: --help and man into a closed pipe."""
    for argv in (["man"], ["--help"], ["completion", "bash"]):
        for _ in range(3):
            p = subprocess.Popen([sys.executable, "-m", "nsmount", *argv],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
            assert p.stdout is not None and p.stderr is not None
            p.stdout.read(1)
            p.stdout.close()
            err = p.stderr.read()
            rc = p.wait(timeout=60)
            assert rc in (0, -13) and err == b"", (argv, rc, err)


# ------------------------------------------------------------------ the libvirt hook
DOMAIN_XML = "<domain type='kvm'><name>vm1</name><devices/></domain>\n"


def _venv(where: Path) -> Path:
    """A virtualenv of the base interpreter (nsmount needs only the stdlib to start)."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    return where / "bin" / "python"


def _run_hook(path: Path, *args: str, stdin: str = DOMAIN_XML,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(path), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.mark.slow
def test_hook_fails_open(tmp_path: Path) -> None:
    # a private copy of the package, so removing it leaves the repository alone
    pkg = tmp_path / "site"
    shutil.copytree(REPO / "nsmount", pkg / "nsmount",
                    ignore=shutil.ignore_patterns("__pycache__"))
    py = _venv(tmp_path / "venv")
    hooks = tmp_path / "hooks"
    r = subprocess.run([str(py), "-m", "nsmount", "install-hook", "--hooks-dir", str(hooks)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pkg)})
    assert r.returncode == 0, r
    hook = hooks / "qemu.d" / "50-nsmount"
    assert os.access(hook, os.X_OK) and str(pkg) in hook.read_text()
    lv = {"NSMOUNT_LIBVIRT_STATE_DIR": str(tmp_path / "lv")}

    # everything present, but no such domain / bad XML: nsmount says why, exit 0
    for xml in (DOMAIN_XML, "<domain><oops", "\udcff garbage"):
        r = _run_hook(hook, "vm1", "reconnect", "begin", "-",
                      stdin=xml.encode("utf-8", "surrogateescape").decode("latin-1"), env=lv)
        assert r.returncode == 0 and "vm1" in r.stderr and "Traceback" not in r.stderr, r
    # other operations never start Python
    r = _run_hook(hook, "vm1", "stopped", "end", "-", env=lv)
    assert r.returncode == 0 and r.stderr == "", r
    # the package removed: exit 0
    shutil.rmtree(pkg)
    r = _run_hook(hook, "vm1", "reconnect", "begin", "-", env=lv)
    assert r.returncode == 0 and "nsmount failed" in r.stderr, r
    # the interpreter (the whole virtualenv) removed: exit 0
    shutil.rmtree(tmp_path / "venv")
    for op in ("reconnect", "started"):
        r = _run_hook(hook, "vm1", op, "begin", "-", env=lv)
        assert r.returncode == 0 and "is gone" in r.stderr, r


def test_uninstall_hook_undoes_install(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    r = nsm("install-hook", "--hooks-dir", str(hooks))
    assert r.returncode == 0 and (hooks / "qemu.d" / "50-nsmount").exists(), r
    assert "install-hook" in r.stderr  # the audit trail of a host change
    r = nsm("uninstall-hook", "--hooks-dir", str(hooks), "--dry-run")
    assert r.returncode == 0 and "would remove" in r.stdout, r
    assert (hooks / "qemu.d" / "50-nsmount").exists()
    r = nsm("uninstall-hook", "--hooks-dir", str(hooks))
    assert r.returncode == 0 and not (hooks / "qemu.d" / "50-nsmount").exists(), r
    r = nsm("uninstall-hook", "--hooks-dir", str(hooks))
    assert r.returncode == 0 and "not installed" in r.stdout, r

    # not ours: left alone, refused
    (hooks / "qemu.d" / "50-nsmount").write_text("#!/bin/sh\nexit 0\n")
    r = nsm("uninstall-hook", "--hooks-dir", str(hooks))
    assert r.returncode == 2 and "not nsmount's" in r.stderr, r
    assert (hooks / "qemu.d" / "50-nsmount").read_text() == "#!/bin/sh\nexit 0\n"


def test_uninstall_legacy_hook_restores_the_chained_one(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    old = "#!/bin/sh\necho old \"$@\" >&2\ncat >/dev/null\nexit 3\n"
    (hooks / "qemu").write_text(old)
    os.chmod(hooks / "qemu", 0o755)
    before = sorted(os.listdir(hooks))
    r = nsm("install-hook", "--legacy", "--hooks-dir", str(hooks))
    assert r.returncode == 0 and (hooks / "qemu.nsmount-chained").read_text() == old, r
    # the wrapper keeps the chained hook's exit status and runs it for every operation
    for op in ("stopped", "reconnect"):
        run = _run_hook(hooks / "qemu", "vm1", op, "begin", "-",
                        env={"PYTHONPATH": str(REPO),
                             "NSMOUNT_LIBVIRT_STATE_DIR": str(tmp_path / "lv")})
        assert run.returncode == 3 and "old vm1" in run.stderr, run
    r = nsm("uninstall-hook", "--legacy", "--hooks-dir", str(hooks))
    assert r.returncode == 0, r
    assert sorted(os.listdir(hooks)) == before and (hooks / "qemu").read_text() == old
    assert os.access(hooks / "qemu", os.X_OK)

    # installed without a previous hook: removed entirely
    shutil.rmtree(hooks)
    assert nsm("install-hook", "--legacy", "--hooks-dir", str(hooks)).returncode == 0
    assert nsm("uninstall-hook", "--legacy", "--hooks-dir", str(hooks)).returncode == 0
    assert os.listdir(hooks) == []


# ------------------------------------------------------------------ output formats
def test_schema_names_every_action_and_status() -> None:
    schema = json.loads((REPO / "docs" / "nsmount-output.schema.json").read_text())
    defs = schema["$defs"]
    assert set(defs["action"]["properties"]["action"]["enum"]) == {kebab(c.__name__)
                                                                   for c in STEPS}
    assert defs["outcome"]["properties"]["status"]["enum"] == [
        "ok", "would-repair", "repaired", "failed"]


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def test_printers_escape_hostile_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lone surrogates, newlines and escape sequences from a VM print as escapes on an
    ASCII stdout, never raise, never forge a line."""
    evil = "/dev/a\nFAKE \x1b[31m\udcff"
    buf = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", buf)
    out = cli_print.Out()
    drift = _Obj(kind="missing-node", path=evil, detail="x")
    o = _Obj(name="vm\n1", pid=7, source="record", warnings=[f"w {evil}"], drifts=[drift],
             results=[], actions=[], error="", status="ok",
             extra={"mounts": [{"id": 1, "parent": 0, "target": "/", "source": evil,
                                "fstype": "ext4", "propagation": "slave", "master": 3},
                               {"id": 2, "parent": 1, "target": evil, "source": "t",
                                "fstype": "tmpfs", "propagation": "private"}],
                    "dev": [{"path": evil, "kind": "lnk", "target": evil}],
                    "dev_fstype": "tmpfs"})
    cli_print.inspect(out, o, cli_print.DEFAULT_MOUNT_COLUMNS)
    cli_print.outcome(out, o, verb="repair")
    buf.flush()
    text = buf.buffer.getvalue().decode("ascii")  # type: ignore[attr-defined]
    assert "FAKE" in text and "\x1b" not in text
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert "\\377" in text and "\\012" in text and "/dev/a" in text
    assert "`-" in text  # an ASCII stdout gets an ASCII tree


def test_tree_rows_follow_parents() -> None:
    mounts = [{"id": 1, "parent": 0, "target": "/"}, {"id": 2, "parent": 1, "target": "/dev"},
              {"id": 3, "parent": 2, "target": "/dev/pts"}, {"id": 4, "parent": 1,
                                                             "target": "/proc"},
              {"id": 5, "parent": 6, "target": "/x"}, {"id": 6, "parent": 5, "target": "/y"}]
    rows = [t for t, _ in cli_print.mount_tree_rows(mounts)]
    assert rows == ["/", "├─/dev", "│ └─/dev/pts", "└─/proc", "/x", "└─/y"], rows


def test_ctrl_c_exits_130_without_traceback() -> None:
    """Interrupted while waiting (here: for a spec on stdin): 130, nothing on stderr."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "nsmount", "exec", "--dry-run", "--spec", "-",
                          "--", "true"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(1.0)  # parsed and blocked in read(stdin)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and b"Traceback" not in err, (p.returncode, err)
