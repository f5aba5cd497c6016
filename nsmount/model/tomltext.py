"""TOML files of the admin (the host configuration, the device policy): parsed with
errors as one line, ``FILE:LINE: what``, the line the admin has to look at."""

from __future__ import annotations

import re
import tomllib
from typing import Any


def loads(text: str, path: str, error: type[Exception]) -> dict[str, Any]:
    """``tomllib.loads`` whose syntax errors are ``error("path:line: what")``."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m.group(1)) if m else max(1, text.count("\n") + (not text.endswith("\n")))
        msg = re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)", "", msg)
        raise error(f"{path}:{line}: {msg}") from None
