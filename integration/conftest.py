"""The integration suites get the same host guard and fixtures as tests/ (also when run
alone, ``pytest integration``): the real host's mount table, its /dev and the root
filesystem's own /dev directory must be unchanged after the run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

_spec = importlib.util.spec_from_file_location("nsmount_tests_conftest", _TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
_guard = sys.modules.get("nsmount_tests_conftest")
if _guard is None:
    _guard = importlib.util.module_from_spec(_spec)
    sys.modules["nsmount_tests_conftest"] = _guard
    _spec.loader.exec_module(_guard)

pytest_configure = _guard.pytest_configure
pytest_collection_modifyitems = _guard.pytest_collection_modifyitems
sandbox = _guard.sandbox
