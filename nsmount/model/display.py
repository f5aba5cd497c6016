"""Make text that came from a VM safe to show to an admin.

Everything a VM names is the attacker's: file names in its ``/dev``, symlink
targets, mount points, its domain name.  Such a name may hold bytes that are not
UTF-8 (Python carries them as lone surrogates after ``os.fsdecode``), newlines that
would forge a line in a report, or terminal escape sequences.  Two functions, used
at every text boundary:

* :func:`escape_name` for one name in a column or a sentence: every byte that is not
  printable UTF-8, plus space, tab, newline and backslash, becomes a ``\\ooo`` octal
  escape, as in ``/proc/self/mountinfo`` (so a name never splits a column and the
  mapping stays reversible);
* :func:`safe_line` for a whole line about to be printed or logged: control
  characters and undecodable bytes are escaped the same way, the rest is kept (a
  last guard for anything a printer forgot to escape; it never raises).

JSON output needs neither: ``json.dumps`` escapes control characters, and lone
surrogates survive as ``\\udcXX`` so the original bytes can be recovered with
``os.fsencode``.
"""

from __future__ import annotations

_ALWAYS = frozenset(" \t\n\\")


def _escape(text: str, specials: frozenset[str]) -> str:
    out: list[str] = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\{o - 0xDC00:03o}")
        elif 0xD800 <= o <= 0xDFFF:  # any other lone surrogate: not encodable at all
            out.append(f"\\u{o:04x}")
        elif o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 or ch in specials:
            out.append(f"\\{o:03o}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def escape_name(name: object) -> str:
    """One VM-supplied name, escaped so it cannot break a column or a line."""
    text = str(name)
    if text.isascii() and text.isprintable() and " " not in text and "\\" not in text:
        return text  # the common case, without a per-character walk
    return _escape(text, _ALWAYS)


def safe_line(line: object) -> str:
    """A whole output line with control characters and bad bytes escaped."""
    text = str(line)
    if text.isprintable() and text.isascii():
        return text  # the common case, without a per-character walk
    return _escape(text, frozenset())
