"""Server settings, their defaults, and where the embedded store lives."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

import bento_sandbox

from bento import auth, protocol, session_core
from bento.admission import QUOTA_NAMES, Capacity, Quota, Quotas


def default_data_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "bento")


#: The share of the data dir's file system that all sessions' history may take by default.
HISTORY_DISK_SHARE = 0.25


def default_max_history_bytes(data_dir: str) -> int:
    """A quarter of the file system that holds ``data_dir`` (or would: the
    nearest existing parent is measured when the directory is not made yet)."""
    path = os.path.abspath(data_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return int(st.f_blocks * st.f_frsize * HISTORY_DISK_SHARE)


def make_quotas(default: dict[str, float | None], by_key: dict[str, dict[str, float | None]]) -> Quotas:
    """The quotas from the ``--quota-*`` settings (``default``: name -> value,
    None for no limit) and the named keys' own tables (by key hash), each of
    which replaces the default quotas it names and keeps the others. Raises
    ValueError for a negative value."""
    for table in (default, *by_key.values()):
        for name, value in table.items():
            if name not in QUOTA_NAMES:
                raise ValueError(f"unknown quota {name!r}")
            if value is not None and not value >= 0:
                raise ValueError(f"--quota-{name.replace('_', '-')} must be at least 0, not {value}")
    base = Quota(**_whole(default))
    return Quotas(base, {h: replace(base, **_whole(table)) for h, table in by_key.items()})


def _whole(table: dict[str, float | None]) -> dict[str, Any]:
    """Quota values as the admission counts them: whole numbers but the rate."""
    return {k: v if v is None or k == "executes_per_minute" else int(v) for k, v in table.items()}


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8765
    data_dir: str = field(default_factory=default_data_dir)
    sandbox: str = "none"
    sandbox_cmd: str | None = None
    api_keys: list[str] = field(default_factory=list)  # given without a name: users
    named_keys: list[auth.Key] = field(default_factory=list)  # from the config file
    # Cut off the tokens of sessions whose key was removed (a reload on SIGHUP).
    revoke_sessions: bool = True
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    node: str = "node-1"
    max_message: int = protocol.DEFAULT_MAX_MESSAGE
    buffer_bytes: int = 64 * 1024 * 1024
    buffer_policy: str = "block"
    max_buffer_bytes: int = 1024 * 1024 * 1024
    keep_s: float = 24 * 3600.0  # an ended session stays readable this long after its end
    history_bytes: int = session_core.DEFAULT_HISTORY_BYTES  # acked frames kept per session
    max_history_bytes: int | None = None  # all sessions' history together (None: no server-wide bound)
    idle_timeout_s: float = 300.0
    handshake_timeout_s: float = 10.0
    send_timeout_s: float = 30.0
    max_connections_per_peer: int = 256
    max_sessions: int = 10_000
    out_event_bytes: int = 1024 * 1024
    default_limits: dict[str, float] = field(default_factory=dict)
    max_limits: dict[str, float] = field(default_factory=dict)
    pool_size: int = 2  # warm environments kept ready at least (bwrap and none)
    pool_max: int | None = None  # at most, when executes come fast (None: pool_sizing.default_maximum)
    pool_template: bool = True  # warm exchanges forked from a template process (bento/exchange_template.py)
    sandbox_template: bool = True  # warm bwrap environments forked from one (driver/bento_driver/template.py)
    sandbox_template_renew_s: float = 3600.0  # a new one this often (0: never; bento/sandbox_template.py)
    max_env_bytes: int = 4 * 1024 * 1024 * 1024  # the packages' environments together (envs/)
    max_upload_bytes: int = 256 * 1024 * 1024  # one file put into a running session (file_put)
    max_work_bytes: int = 1024 * 1024 * 1024  # what a function may leave in its work dir (host disk)
    # limit -> what holds it for a whole environment here (bento_sandbox.enforcement()).
    enforceable: dict[str, str] = field(default_factory=dict)
    # Accept limits that only a per-process rlimit (or nothing) holds.
    allow_unenforced_limits: bool = False
    # redis://HOST:PORT/DB (or rediss://, redis+cluster://): run as one node of a cluster
    # on that Redis (bento/cluster/connect.py has the URL forms).
    cluster: str | None = None
    # Cluster mode: how long a node's heartbeat outlives its last renewal (bento/cluster/node.py).
    node_timeout_s: float = 10.0

    # Admission (bento/admission.py): None derives the capacity from the machine at start.
    capacity: Capacity | None = None
    # Every key's quota and the named keys' own (the admission shares it; replaced whole on a reload).
    quotas: Quotas = field(default_factory=Quotas)

    # Every accepted key (api_keys and named_keys); replaced whole on a reload.
    keys: auth.ApiKeys = field(init=False)

    def __post_init__(self) -> None:
        self.keys = auth.ApiKeys(self.key_list())

    def key_list(self) -> list[auth.Key]:
        return [auth.Key.plain(k) for k in self.api_keys if k.strip()] + list(self.named_keys)

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")

    def check(self) -> None:
        """Refuse settings that are unsafe or cannot work."""
        blank = [k for k in self.api_keys if not k.strip()]
        if blank:
            raise ValueError(
                "an API key is empty or blank (an unset $KEY in --api-key \"$KEY\" or "
                "BENTO_API_KEYS=\"$KEY\"?): an empty key is no key; give a real key, or leave "
                "--api-key out and BENTO_API_KEYS unset"
            )
        if not self.loopback and not self.keys.required and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.host} without API keys: "
                "give --api-key-file (or --api-key, BENTO_API_KEYS), or --insecure if you really mean it"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.cluster and not self.cluster.startswith(("redis://", "rediss://", "redis+cluster://",
                                                         "rediss+cluster://")):
            shown = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", self.cluster)  # (its password is not shown)
            raise ValueError(f"--cluster {shown!r}: expected redis://HOST:PORT/DB, "
                             "rediss://HOST:PORT/DB?ca=FILE or redis+cluster://HOST:PORT,HOST:PORT "
                             "(docs/cluster.md)")
        if not 1 <= self.node_timeout_s <= 3600:
            raise ValueError(f"--node-timeout must be from 1s to 1h, not {self.node_timeout_s:g}s")
        if self.buffer_policy not in protocol.BUFFER_POLICIES:
            raise ValueError(f"unknown buffer policy {self.buffer_policy!r}")
        for name, value in (("--keep", self.keep_s), ("--history-bytes", self.history_bytes),
                            ("--max-history-bytes", self.max_history_bytes), ("--pool", self.pool_size),
                            ("--pool-max", self.pool_max)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be a number of at least 0, not {value}")


def session_limits(config: Config, asked: dict) -> dict:
    """A session's limits: what it asked for, the server's defaults for the
    rest, and never above the server's maxima (a limit with a maximum is
    always set). RequestError ``bad_request`` for a limit it may not have."""
    limits = dict(config.default_limits)
    for k, v in asked.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise protocol.RequestError("bad_request", f"limit {k} must be finite")
        top = config.max_limits.get(k)
        if top is not None and v > top:
            raise protocol.RequestError("bad_request", f"limit {k} is at most {top} on this server")
        limits[k] = v
    for k, top in config.max_limits.items():
        limits[k] = min(limits.get(k, top), top)
    if not config.allow_unenforced_limits:
        for k in limits:
            if k not in config.enforceable:
                raise protocol.RequestError(
                    "bad_request",
                    f"limit {k} cannot be enforced on this server "
                    f"({bento_sandbox.unenforceable_reason(k)}): run without it, or ask the "
                    "operator (who may start the server with --allow-unenforced-limits)")
    return limits
