"""Host configuration: ``/etc/nsmount/nsmount.conf`` (TOML).

::

    # mounts every VM must see (besides every hugetlbfs mount, which all VMs get)
    mounts = ["/mnt/huge"]
    # nodes every VM gets, on top of its own default list (optional: a host without
    # one of them is fine)
    default_devices = ["/dev/vhost-net"]
    state_dir = "/run/nsmount"
    libvirt_state_dir = "/run/libvirt/qemu"
    socket_group = "libvirt"      # socket 0660 root:GROUP; unset: 0600 root only
    timeout = 30                  # seconds per VM before it is abandoned
    jobs = 0                      # warm worker processes (0: one per CPU)
    debounce_ms = 20              # quiet time before a batch of events is acted on
    metrics_file = "/var/lib/node_exporter/textfile/nsmount.prom"
    policy = "/etc/nsmount/policy.toml"   # who may have which device fds (default path)

The file is found by ``--config``, then ``$NSMOUNT_CONFIG``, then the default path; a
missing default file is an empty config.  Errors are one line naming the file and
the line (:class:`ConfigError`); the service keeps its last good config then.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ...errors import SpecError
from ...model import tomltext
from ...model.paths import canonical, is_strictly_within
from ...model.policy import DEFAULT_POLICY, Policy, PolicyError
from ...model.policy import parse as parse_policy

DEFAULT_CONFIG = "/etc/nsmount/nsmount.conf"
MAX_CONFIG = 1 << 20
MAX_POLICY = 1 << 20


class ConfigError(SpecError):
    """A bad configuration file: ``FILE:LINE: what``."""


@dataclass(frozen=True)
class Config:
    path: str | None = None
    mounts: tuple[str, ...] = ()
    default_devices: tuple[str, ...] = ()
    state_dir: str | None = None
    libvirt_state_dir: str | None = None
    socket_group: str | int | None = None
    timeout: float = 30.0
    jobs: int = 0
    debounce_ms: int = 20
    metrics_file: str | None = None
    policy: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


_KEYS = {"mounts", "default_devices", "state_dir", "libvirt_state_dir", "socket_group",
         "timeout", "jobs", "debounce_ms", "metrics_file", "policy"}


def config_path(override: str | None = None) -> tuple[str, bool]:
    """(path, explicit): explicit paths must exist, the default one may be absent."""
    if override:
        return override, True
    env = os.environ.get("NSMOUNT_CONFIG")
    if env:
        return env, True
    return DEFAULT_CONFIG, False


def load(override: str | None = None) -> Config:
    path, explicit = config_path(override)
    from ...state.files import read_state_text

    try:
        text = read_state_text(path, limit=MAX_CONFIG)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return Config(path=None)
    except SpecError as exc:
        raise ConfigError(exc.oneline()) from None
    return parse(text, path)


def _line_of(text: str, key: str) -> int:
    pat = re.compile(rf"^[ \t]*\"?{re.escape(key)}\"?[ \t]*=", re.M)
    m = pat.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else 1


def parse(text: str, path: str = "<config>") -> Config:
    data = tomltext.loads(text, path, ConfigError)
    cfg: dict[str, Any] = {"path": path}
    for key, val in data.items():
        where = f"{path}:{_line_of(text, key)}"
        if key not in _KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}")
        try:
            cfg[key] = _value(key, val)
        except (ValueError, SpecError) as exc:
            msg = exc.oneline() if isinstance(exc, SpecError) else str(exc)
            raise ConfigError(f"{where}: {key}: {msg}") from None
    return Config(**cfg)


def _value(key: str, val: Any) -> Any:
    if key in ("mounts", "default_devices"):
        if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
            raise ValueError("must be a list of absolute paths")
        out = tuple(canonical(x, what=key[:-1].replace("_", " ")) for x in val)
        if key == "default_devices" and not all(is_strictly_within(p, "/dev") for p in out):
            raise ValueError("devices must be under /dev")
        if key == "mounts" and "/" in out:
            raise ValueError("'/' is not a mount VMs can be given")
        return out
    if key in ("state_dir", "libvirt_state_dir", "metrics_file", "policy"):
        if not isinstance(val, str):
            raise ValueError("must be a string")
        return canonical(val)
    if key == "socket_group":
        if isinstance(val, bool) or not isinstance(val, (str, int)):
            raise ValueError("must be a group name or a gid")
        if isinstance(val, int) and not 0 <= val < 2 ** 32:
            raise ValueError("gid out of range")
        if isinstance(val, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", val):
            raise ValueError("not a valid group name")
        return val
    if key == "timeout":
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < val <= 86400:
            raise ValueError("must be a number of seconds in (0, 86400]")
        return float(val)
    if key == "jobs":
        if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val <= 1024:
            raise ValueError("must be an integer in [0, 1024]")
        return val
    if key == "debounce_ms":
        if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val <= 10000:
            raise ValueError("must be an integer in [0, 10000]")
        return val
    raise ValueError("unknown key")  # pragma: no cover


def resolve_gid(group: str | int | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group: no group named {group!r}") from None


def policy_path(cfg: Config, override: str | None = None) -> str:
    """``--policy``, else the configuration's ``policy``, else the default path."""
    return override or cfg.policy or DEFAULT_POLICY


def load_policy(path: str) -> Policy:
    """The device policy at ``path`` (:mod:`nsmount.model.policy`); a missing file is an
    empty policy: nothing is granted.  PolicyError (``FILE:LINE: what``) otherwise."""
    from ...state.files import read_state_text

    try:
        text = read_state_text(path, limit=MAX_POLICY)
    except FileNotFoundError:
        return Policy(None, ())
    except SpecError as exc:
        raise PolicyError(exc.oneline()) from None
    return parse_policy(text, path)
