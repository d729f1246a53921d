"""The CLI's settings and its view of the state file: where to connect, with
which key, and which session a word on the command line names.

Settings come from flags, then the environment, then the config file, then
defaults (docs/cli.md, "Settings"). Nothing here talks to a server.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from dataclasses import dataclass
from typing import Any

import bento
from bento_clients import sdk
from bento_clients.convert import from_json
from bento_clients.state import StateFile
from bento_clients.terminal import DEFAULT_DETACH_KEYS

__all__ = ["CLIENT_NAME", "EXIT_BENTO", "EXIT_USAGE", "Settings", "UsageError", "config_path", "known_entry",
           "load_config", "normalize_url", "parse_json_arg", "settings_from", "token_of"]

EXIT_USAGE = 2
CLIENT_NAME = f"bento-cli/{bento.__version__}"
EXIT_BENTO = 125  # bento itself failed (streaming commands, whose other codes are the function's)


class UsageError(Exception):
    """A mistake in what the user typed: one line, exit code 2."""


# --------------------------------------------------------------------------
# Settings: flags > environment > config file > defaults.


def config_path() -> str:
    """``$BENTO_CONFIG``, else ``$XDG_CONFIG_HOME/bento/config.toml``, else
    ``~/.config/bento/config.toml``."""
    explicit = os.environ.get("BENTO_CONFIG")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "bento", "config.toml")


CONFIG_KEYS = ("server", "api_key", "ca_file", "detach_keys", "connect_timeout", "reconnect_timeout")


def load_config(path: str | None = None) -> dict[str, Any]:
    """The config file's settings (TOML; keys: CONFIG_KEYS); {} when it does not exist."""
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read the config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)} in {path} (known: {', '.join(CONFIG_KEYS)})")
    return data


def normalize_url(text: str) -> str:
    """``host:port`` -> ``ws://host:port/v1``; a ws(s) URL without a path gets ``/v1``."""
    text = text.strip()
    if "://" not in text:
        text = "ws://" + text
    scheme, _, rest = text.partition("://")
    if scheme not in ("ws", "wss"):
        raise UsageError(f"bad server address {text!r}: use ws://HOST:PORT/v1 or wss://...")
    if "/" not in rest:
        rest += "/v1"
    return f"{scheme}://{rest}"


@dataclass
class Settings:
    server: str | None  # from --server: wins over a session's recorded server
    default_server: str  # $BENTO_SERVER, the config file or the default: for new sessions
    api_key: str | None
    ca_file: str | None  # certificates that verify a wss:// server (None: the system's)
    json: bool
    verbose: bool
    connect_timeout: float
    reconnect_timeout: float
    detach_keys: str
    state: StateFile

    def server_for(self, entry: dict[str, Any] | None = None) -> str:
        """Where a session lives: ``--server``, else where it was started, else the default."""
        if self.server:
            return self.server
        if entry and entry.get("server"):
            return str(entry["server"])
        return self.default_server


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings for one command: flags > environment > config file > defaults."""
    cfg = load_config(getattr(args, "config", None))
    flag_server = getattr(args, "server", None)
    default_server = os.environ.get("BENTO_SERVER") or cfg.get("server") or sdk.DEFAULT_URL
    try:
        connect_timeout = float(getattr(args, "connect_timeout", None)
                                or os.environ.get("BENTO_CONNECT_TIMEOUT") or cfg.get("connect_timeout", 10))
        reconnect_timeout = float(getattr(args, "reconnect_timeout", None) or cfg.get("reconnect_timeout", 60))
    except ValueError as exc:
        raise UsageError(f"bad timeout: {exc}") from None
    ca_file = getattr(args, "ca_file", None) or os.environ.get("BENTO_CA_FILE") or cfg.get("ca_file") or None
    if ca_file is not None:
        try:
            with open(ca_file, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot read the CA file {ca_file}: {exc.strerror or exc}") from None
    return Settings(
        server=normalize_url(flag_server) if flag_server else None,
        default_server=normalize_url(str(default_server)),
        api_key=getattr(args, "api_key", None) or os.environ.get("BENTO_API_KEY") or cfg.get("api_key") or None,
        ca_file=ca_file,
        json=bool(getattr(args, "json", False)),
        verbose=bool(getattr(args, "verbose", False)),
        connect_timeout=connect_timeout,
        reconnect_timeout=reconnect_timeout,
        detach_keys=getattr(args, "detach_keys", None) or cfg.get("detach_keys") or DEFAULT_DETACH_KEYS,
        state=StateFile(getattr(args, "state_file", None)),
    )


def parse_json_arg(text: str, what: str) -> Any:
    """A JSON command-line value ({"$base64": ...} becomes bytes); UsageError if bad."""
    try:
        return from_json(json.loads(text))
    except ValueError as exc:
        raise UsageError(f"bad JSON for {what}: {text!r} ({exc}); quote strings: '\"text\"'") from None


def known_entry(settings: Settings, word: str) -> dict[str, Any] | None:
    """The state file's entry for a token, session id or name (None for a token
    this machine has not seen); UsageError for a word that is none of these."""
    entry = settings.state.find(word)
    if entry is None and not word.startswith(("bto_", "btv_")):
        raise UsageError(f"{word!r} is not a token (bto_... or btv_...), nor the id or name of a session "
                         f"this machine knows (see bento ls)")
    return entry


def token_of(entry: dict[str, Any] | None, word: str, owner: bool = False) -> str:
    """The token to use: a session id or name this machine knows stands for its token."""
    if entry is not None and word in (entry.get("session"), entry.get("name")):
        chosen = entry.get("token") or (None if owner else entry.get("viewer_token"))
        if chosen is None:
            raise UsageError(f"this machine does not know the owner token of {word}")
        return str(chosen)
    return word

