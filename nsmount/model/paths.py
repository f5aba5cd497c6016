"""Canonical absolute paths, compared by component (never by string prefix)."""

from __future__ import annotations

import functools
import posixpath

from ..errors import UnsafePathError


def canonical(path: str, *, what: str = "path") -> str:
    """Return ``path`` normalised, refusing relative paths, '..' and NUL.

    ``/dev//sda`` and ``/dev/./sda`` become ``/dev/sda``; ``/dev/../etc`` is refused
    rather than normalised, because a '..' in a configured device path is either a
    mistake or an attack (the reference checked a '/dev' string prefix and let
    ``/dev/../var/x`` through).
    """
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"{what} is empty")
    if "\0" in path:
        raise UnsafePathError(f"{what} {path!r} contains a NUL byte")
    if not path.startswith("/"):
        raise UnsafePathError(f"{what} {path!r} is not absolute")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(f"{what} {path!r} contains '..'")
    return "/" + "/".join(parts)


@functools.lru_cache(maxsize=4096)
def components(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


def is_within(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it, by whole components."""
    p, r = components(path), components(root)
    return p[: len(r)] == r


def is_strictly_within(path: str, root: str) -> bool:
    return is_within(path, root) and components(path) != components(root)


def join_link(link_path: str, target: str) -> str:
    """Resolve a symlink target against the link's directory, lexically.

    '..' is allowed here (``../../sda`` from ``/dev/disk/by-id``) and resolved
    lexically; the caller re-checks the result with :func:`canonical`.
    """
    if target.startswith("/"):
        joined = target
    else:
        joined = posixpath.join(posixpath.dirname(link_path), target)
    return posixpath.normpath(joined).replace("//", "/")


def relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` (both canonical, path within root)."""
    rel = components(path)[len(components(root)):]
    return "/".join(rel)


def dev_path_of(path: object, *, what: str = "path") -> tuple[str | None, str | None]:
    """Classify a path a VM definition names: ``(node, None)``, ``(None, refusal)`` or
    ``(None, None)``.

    libvirt accepts relative paths and '..' in image paths, so they are no error:
    a path outside /dev is normalised and quietly not ours (``(None, None)``); a
    relative path never names a /dev node to libvirt.  Only an absolute path that
    lands in /dev *through* '..' (``/var/../dev/sda``, ``/dev/x/../sda``) is refused,
    with a one-line reason, so the caller can report that one device and go on.
    """
    if not isinstance(path, str) or not path:
        return None, None
    if "\0" in path:
        return None, f"{what} {path[:60]!r} contains a NUL byte"
    if not path.startswith("/"):
        return None, None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        norm = posixpath.normpath("/" + "/".join(parts))
        if is_within(norm, "/dev"):
            return None, f"{what} {path[:80]!r} reaches /dev through '..': refused"
        return None, None
    p = "/" + "/".join(parts)
    return (p, None) if is_strictly_within(p, "/dev") else (None, None)
