"""The server's config file (TOML) and its API keys, read into the command line's terms.

A config file uses the names of ``bento server``'s flags (``data_dir``,
``max_limit = {memory_bytes = "512MiB"}``, ...); a flag given on the command
line wins over the file. Two names exist only here: ``[keys.NAME]`` tables
(named keys with a role, and the key's own quota: ``quota = {sessions = 2}``)
and ``revoke_sessions``. An unknown name is an error
naming it and the file. Nothing here logs or prints a key.
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from bento import auth, protocol, units

FILE_ONLY = ("keys", "revoke_sessions")
NOT_IN_FILE = ("help", "config", "hash_key")
LIMIT_OPTIONS = ("default_limit", "max_limit")
KEY_SOURCES = ("key", "key_file", "key_hash")
# A key's quota table: name -> what reads its value (``"none"`` is no limit).
QUOTA_VALUES: dict[str, Any] = {"sessions": int, "executes_per_minute": float,
                                "history_bytes": units.size, "environments": int}


class SettingsError(ValueError):
    """A config file or key file that cannot be used; the message names the file."""


@dataclass
class FileSettings:
    """What a config file says, as parser defaults plus what only the file holds."""

    path: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    named_keys: list[auth.Key] = field(default_factory=list)
    # A named key's own quotas (by key hash): name -> value, None for no limit.
    quotas: dict[str, dict[str, float | None]] = field(default_factory=dict)
    revoke_sessions: bool = True


def load(path: str | None, parser: argparse.ArgumentParser) -> FileSettings:
    """Read the config file at ``path`` (None: no file) against ``parser``'s options."""
    if path is None:
        return FileSettings()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: not valid TOML: {exc}") from None
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_FILE}
    out = FileSettings(path=path)
    for name, value in raw.items():
        where = f"config file {path}: {name}"
        if name == "keys":
            out.named_keys, out.quotas = _named_keys(value, path)
        elif name == "revoke_sessions":
            if not isinstance(value, bool):
                raise SettingsError(f"{where}: must be true or false")
            out.revoke_sessions = value
        elif name in actions:
            out.defaults[name] = _option_value(actions[name], value, where)
        else:
            known = ", ".join(sorted([*actions, *FILE_ONLY]))
            raise SettingsError(f"{where}: unknown setting (known: {known})")
    return out


def _option_value(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` from the file as the parser would hold it after the flag."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: must be true or false")
        return value
    if action.dest in LIMIT_OPTIONS:
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: must be a table, e.g. {action.dest} = {{memory_bytes = \"512MiB\"}}")
        items = [f"{k}={v}" for k, v in value.items()]
        try:
            parse_limits(items)
        except ValueError as exc:
            raise SettingsError(f"{where}: {exc}") from None
        return items
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise SettingsError(f"{where}: must be text or a list of text")
        return items
    if isinstance(value, dict | list | bool):
        raise SettingsError(f"{where}: must be a single value")
    try:
        converted = action.type(value) if callable(action.type) else value
    except (TypeError, ValueError) as exc:
        what = {int: "a whole number", float: "a number"}.get(action.type)  # type: ignore[call-overload]
        raise SettingsError(f"{where}: must be {what}, not {value!r}" if what else f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise SettingsError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def parse_limits(items: list[str]) -> dict[str, float | None]:
    """``KEY=VALUE`` items (values with suffixes, or ``none``) as limits; later items win."""
    out: dict[str, float | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in protocol.LIMIT_KEYS:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {sorted(protocol.LIMIT_KEYS)}")
        out[key] = None if value.strip().lower() == "none" else units.limit_value(key, value)
    return out


def _named_keys(table: Any, path: str) -> tuple[list[auth.Key], dict[str, dict[str, float | None]]]:
    if not isinstance(table, dict):
        raise SettingsError(f"config file {path}: keys: must be tables, e.g. [keys.alice]")
    out: list[auth.Key] = []
    quotas: dict[str, dict[str, float | None]] = {}
    for name, spec in table.items():
        where = f"config file {path}: keys.{name}"
        if not isinstance(spec, dict):
            raise SettingsError(f"{where}: must be a table with key_file (or key_hash) and role")
        unknown = sorted(set(spec) - {*KEY_SOURCES, "role", "quota"})
        if unknown:
            raise SettingsError(f"{where}: unknown setting {unknown[0]!r} "
                                f"(known: role, quota, {', '.join(KEY_SOURCES)})")
        role = spec.get("role", "user")
        if role not in auth.ROLES:
            raise SettingsError(f"{where}: role {role!r} is not one of {', '.join(auth.ROLES)}")
        given = [k for k in KEY_SOURCES if k in spec]
        if len(given) != 1:
            raise SettingsError(f"{where}: give exactly one of {', '.join(KEY_SOURCES)}")
        source = spec[given[0]]
        if not isinstance(source, str) or not source.strip():
            raise SettingsError(f"{where}: {given[0]} must be non-empty text")
        if given[0] == "key_hash":
            digest = source.strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise SettingsError(f"{where}: key_hash must be 64 hex digits (from `bento server --hash-key`)")
        else:
            keys = [source] if given[0] == "key" else read_key_file(source)
            if len(keys) != 1:
                raise SettingsError(f"{where}: key file {source} must hold exactly one key (it has {len(keys)})")
            digest = auth.key_hash(keys[0])
        out.append(auth.Key(name=str(name), role=role, hash=digest))
        if "quota" in spec:
            quotas[digest] = _quota(spec["quota"], f"{where}.quota")
    hashes = [k.hash for k in out]
    if len(set(hashes)) != len(hashes):
        raise SettingsError(f"config file {path}: two [keys.*] entries have the same key")
    return out, quotas


def _quota(table: Any, where: str) -> dict[str, float | None]:
    """A key's quota table: each given quota's value (None: ``"none"``, no limit)."""
    if not isinstance(table, dict):
        raise SettingsError(f"{where}: must be a table, e.g. quota = {{sessions = 4, executes_per_minute = 60}}")
    out: dict[str, float | None] = {}
    for name, value in table.items():
        read = QUOTA_VALUES.get(name)
        if read is None:
            raise SettingsError(f"{where}: unknown quota {name!r} (known: {', '.join(QUOTA_VALUES)})")
        if isinstance(value, str) and value.strip().lower() == "none":
            out[name] = None
            continue
        try:
            if isinstance(value, bool) or (read is int and not isinstance(value, int)):
                raise ValueError(f"{value!r} is not a whole number")
            number = read(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{where}.{name}: {exc} (or \"none\" for no limit)") from None
        if not (math.isfinite(number) and number >= 0):
            raise SettingsError(f"{where}.{name}: must be a number of at least 0, not {value!r}")
        out[name] = number
    return out


def read_key_file(path: str) -> list[str]:
    """The keys in a key file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise SettingsError(f"key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"key file {path}: not UTF-8 text") from None
    if st.st_mode & 0o004:
        raise SettingsError(f"key file {path}: readable by every user; chmod o-r {path}")
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

