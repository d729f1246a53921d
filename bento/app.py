"""The ``bento`` command: ``bento server`` runs a server; the other commands are
the client CLI (``bento_clients.cli``)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass
from typing import Any

from bento import auth, events, settings, units
from bento.admission import Quotas
from bento.config import Config, default_data_dir, default_max_history_bytes, make_quotas


def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bento server", description="Run a Bento server.",
        epilog="Sizes take suffixes (64K, 512MiB, 1G), times too (30s, 1.5m, 2h, 1d). Every option "
               "can also be set in a --config file under its name (data_dir = ...); flags win.")
    p.add_argument("--config", metavar="PATH",
                   help="a TOML file with these options by name, and named API keys (docs/operations.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=units.count(0, 65535), default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--data-dir", default=default_data_dir(), help="where sessions and functions live")
    p.add_argument("--sandbox", default="auto", choices=["auto", "bwrap", "none", "cmd"],
                   help="environment backend (default auto: bwrap when it works here, else none)")
    p.add_argument("--sandbox-cmd", help="run the driver behind this command prefix (implies --sandbox cmd)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require this API key for store/execute/list (repeatable; also BENTO_API_KEYS). "
                        "Visible in ps: prefer --api-key-file or the config file")
    p.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="API keys, one per line (# comments); not readable by other users (repeatable)")
    p.add_argument("--hash-key", action="store_true",
                   help="read an API key on stdin, print the key_hash a config file may hold, and exit")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without API keys")
    p.add_argument("--tls-cert", help="certificate (PEM) to serve wss://")
    p.add_argument("--tls-key", help="private key (PEM, not encrypted) for --tls-cert")
    p.add_argument("--keep", type=units.duration, default=None,
                   help="how long an ended session (its exit, history and files) stays readable "
                        "after its end; a running function is never ended by it (default 24h)")
    p.add_argument("--ttl", type=units.duration, default=None, help="deprecated name of --keep")
    p.add_argument("--history-bytes", type=units.size, default=64 * 1024 * 1024,
                   help="acked output kept readable per session, oldest trimmed first (default 64MiB)")
    p.add_argument("--max-history-bytes", type=units.size, default=None,
                   help="acked output kept readable by all sessions together; the oldest sessions' "
                        "history is trimmed first (default: a quarter of the data dir's file system)")
    p.add_argument("--idle-timeout", type=units.duration, default=300.0,
                   help="close connections silent this long (default 300s)")
    p.add_argument("--handshake-timeout", type=units.duration, default=10.0,
                   help="close connections that do not say hello this fast (default 10s)")
    p.add_argument("--max-message", type=units.size, default=16 * 1024 * 1024,
                   help="largest message in either direction (default 16MiB)")
    p.add_argument("--max-buffer-bytes", type=units.size, default=1024 * 1024 * 1024,
                   help="largest buffer.max_bytes an execute may ask for (default 1GiB)")
    p.add_argument("--send-timeout", type=units.duration, default=30.0,
                   help="drop a client that does not read a message this long (default 30s)")
    p.add_argument("--buffer-bytes", type=units.size, default=64 * 1024 * 1024,
                   help="default output buffer per session (default 64MiB)")
    p.add_argument("--buffer-policy", default="block", choices=["block", "drop_oldest", "fail"],
                   help="what a full buffer does by default (default block)")
    p.add_argument("--default-limit", action="append", default=[], metavar="KEY=VALUE",
                   help="a limit for executes that do not set it (repeatable; KEY=none removes "
                        f"a built-in default). Built in: {DEFAULT_LIMITS_TEXT}; with bwrap also "
                        f"{BWRAP_LIMITS_TEXT}")
    p.add_argument("--max-limit", action="append", default=[], metavar="KEY=VALUE",
                   help="the most an execute may ask for, e.g. memory_bytes=512MiB (repeatable); a "
                        "limit with a maximum is always in force, at most that value")
    p.add_argument("--allow-unenforced-limits", action="store_true",
                   help="accept limits this machine cannot hold for a whole environment (no "
                        "cgroup for them): they get a per-process rlimit or nothing, and status "
                        "says so. Without it such limits are refused")
    p.add_argument("--pool", type=units.count(0), default=2,
                   help="fresh environments kept started ahead of time for fast executes, never reused "
                        "(bwrap and none; default 2; 0 = off); more while executes come fast (--pool-max)")
    p.add_argument("--pool-max", type=units.count(0), metavar="N",
                   help="most warm environments kept while executes come fast (each holds ~5 MiB PSS, "
                        "~27 MiB RSS; default: 4 per core, at most 1/64 of RAM, at most 32)")
    p.add_argument("--no-pool-template", dest="pool_template", action="store_false",
                   help="start each warm exchange as a process of its own, also while executes come fast, "
                        "instead of forking it from a template process (more CPU under load; each sandbox is "
                        "fresh either way)")
    p.add_argument("--no-sandbox-template", dest="sandbox_template", action="store_false",
                   help="start each warm environment as a bwrap of its own instead of forking it from the "
                        "sandbox template (more CPU and memory per environment; each gets a fresh sandbox "
                        "either way)")
    p.add_argument("--sandbox-template-renew", type=units.duration, default=3600.0, metavar="DURATION",
                   help="start a new sandbox template this often, so that the environments forked from one "
                        "share its hash secret and address layout for that long at most; 0: never "
                        "(default 1h)")
    p.add_argument("--max-sessions", type=units.count(1), metavar="N",
                   help="most functions running at once (default: one per 64MiB of RAM)")
    p.add_argument("--memory-budget", type=units.size, metavar="SIZE",
                   help="the running functions' memory limits may add up to this, e.g. 16G (default 3/4 "
                        "of RAM; a function without a memory limit counts the default memory_bytes)")
    p.add_argument("--disk-floor", type=units.size, metavar="SIZE",
                   help="refuse new executes while the data dir has less free space, e.g. 1G (default "
                        "5%% of its file system, at most 1GiB); running functions keep writing")
    p.add_argument("--max-queued", type=units.count(0), default=1024, metavar="N",
                   help="most executes waiting for capacity at once (\"queue\": seconds; default 1024)")
    p.add_argument("--quota-sessions", type=units.count(0), metavar="N",
                   help="most functions one API key runs at once (default: no quota)")
    p.add_argument("--quota-executes-per-minute", type=float, metavar="RATE",
                   help="executes one API key may start per minute, with a burst of as many (default: no quota)")
    p.add_argument("--quota-history-bytes", type=units.size, metavar="SIZE",
                   help="output one API key's sessions may retain (unacknowledged plus history) before "
                        "its executes are refused (default: no quota)")
    p.add_argument("--quota-environments", type=units.count(0), metavar="N",
                   help="package environments one API key's executes may have built (those that exist "
                        "now); an execute with new packages over it is refused (default: no quota)")
    p.add_argument("--max-env-bytes", type=units.size, default=4 * 1024 * 1024 * 1024,
                   help="bytes the environments of executes' packages may take together under the data "
                        "dir (default 4GiB); the least recently used go first")
    p.add_argument("--max-work-bytes", type=units.size, default=1024 * 1024 * 1024,
                   help="disk a function may fill in its work dir (its home, kept after the run; default "
                        "1GiB): over it, it is killed (LimitExceeded work_bytes)")
    p.add_argument("--max-upload-bytes", type=units.size, default=256 * 1024 * 1024,
                   help="the largest file a client may put into a running session (default 256MiB)")
    p.add_argument("--node", default="node-1",
                   help="this node's name, sent in hello; unique in a cluster")
    p.add_argument("--cluster", metavar="URL",
                   help="run as a node of a cluster on this Redis (redis://HOST:PORT/DB, "
                        "rediss://HOST:PORT/DB?ca=FILE, redis+cluster://HOST:PORT,HOST:PORT): any node "
                        "serves any token (docs/cluster.md)")
    p.add_argument("--node-timeout", type=units.duration, default=10.0, metavar="DURATION",
                   help="cluster mode: how long this node's heartbeat outlives its last renewal (it "
                        "renews every fifth of it); a node silent this long is taken for dead and its "
                        "running sessions end lost (default 10s, 1s to 1h)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="least important log lines written to stderr (default INFO: session events)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="stderr log lines as text (default) or one JSON object per line")
    return p


# Server defaults for executes that set no limit, so a forgotten job ends.
DEFAULT_LIMITS: dict[str, float] = {"wall_s": 24 * 3600.0, "cpu_s": 4 * 3600.0}
DEFAULT_LIMITS_TEXT = "wall_s=24h, cpu_s=4h"
# With bwrap, sessions that ask for nothing could otherwise take the host's pids
# and memory (tmpfs writes are charged to the memory cgroup).
BWRAP_LIMITS: dict[str, float] = {"pids": 256, "memory_bytes": 1024 * 1024 * 1024}
BWRAP_LIMITS_TEXT = "pids=256, memory_bytes=1GiB"


@dataclass
class Resolved:
    """The command line and config file together: options, and every accepted key."""

    args: argparse.Namespace
    file: settings.FileSettings
    plain_keys: list[str]


def resolve(argv: list[str]) -> Resolved:
    """Options from ``argv`` over those of its --config file; keys from everywhere.
    Raises SettingsError (argparse exits 2 on a bad flag)."""
    parser = server_parser()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file = settings.load(known.config, parser)
    parser.set_defaults(**file.defaults)
    args = parser.parse_args(argv)
    keys = list(args.api_key)
    from_env = os.environ.get("BENTO_API_KEYS")
    if from_env is not None:
        # Set but blank ("$KEYS" unset), or an empty item: refused like a blank --api-key.
        keys += [k.strip() for k in from_env.split(",")]
    for path in args.api_key_file:
        found = settings.read_key_file(path)
        if not found:
            raise settings.SettingsError(f"key file {path}: holds no key")
        keys += found
    return Resolved(args, file, keys)


def tls_problem(cert: str, key: str) -> str | None:
    """Why this certificate and key cannot serve TLS, in one line naming the file; None if they can."""
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return f"{option} {path}: {exc.strerror}"
    try:
        ssl.create_default_context().load_verify_locations(cafile=cert)
    except ssl.SSLError:
        return f"--tls-cert {cert}: no PEM certificate in it"
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def no_password() -> bytes:
        raise ValueError("encrypted")

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            return f"--tls-key {key}: does not belong to the certificate in --tls-cert {cert}"
        return f"--tls-key {key}: not a PEM private key for it ({exc.reason or exc})"
    except ValueError:
        return f"--tls-key {key}: the key is encrypted; give it decrypted (readable by this user only)"
    return None


def build_config(r: Resolved) -> Config:
    args = r.args
    keep = args.keep
    if args.ttl is not None:
        print("bento server: --ttl (ttl in a config file) is deprecated: it is --keep (keep), an ended "
              "session's keep period", file=sys.stderr)
        if keep is None:
            keep = args.ttl
    return Config(
        host=args.host, port=args.port, data_dir=args.data_dir, sandbox=args.sandbox,
        api_keys=r.plain_keys, named_keys=r.file.named_keys, revoke_sessions=r.file.revoke_sessions,
        insecure=args.insecure, tls_cert=args.tls_cert, tls_key=args.tls_key,
        keep_s=24 * 3600.0 if keep is None else keep, history_bytes=args.history_bytes,
        max_history_bytes=(default_max_history_bytes(args.data_dir) if args.max_history_bytes is None
                           else args.max_history_bytes),
        idle_timeout_s=args.idle_timeout, send_timeout_s=args.send_timeout,
        buffer_bytes=args.buffer_bytes, buffer_policy=args.buffer_policy, node=args.node,
        handshake_timeout_s=args.handshake_timeout, max_message=args.max_message,
        max_buffer_bytes=args.max_buffer_bytes, pool_size=args.pool, pool_max=args.pool_max, pool_template=args.pool_template,
        sandbox_template=args.sandbox_template, sandbox_template_renew_s=args.sandbox_template_renew,
        cluster=args.cluster, node_timeout_s=args.node_timeout,
        max_env_bytes=args.max_env_bytes, max_work_bytes=args.max_work_bytes,
        max_upload_bytes=args.max_upload_bytes,
    )


def quotas_of(r: Resolved) -> Quotas:
    """Every key's quota (the ``--quota-*`` settings) and the named keys' own. Raises ValueError."""
    a = r.args
    return make_quotas({"sessions": a.quota_sessions, "executes_per_minute": a.quota_executes_per_minute,
                        "history_bytes": a.quota_history_bytes, "environments": a.quota_environments},
                       r.file.quotas)


def hash_key() -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("bento server --hash-key: give the key on stdin", file=sys.stderr)
        return 2
    print(auth.key_hash(key))
    return 0


def run_server(argv: list[str]) -> int:
    try:
        resolved = resolve(argv)
    except settings.SettingsError as exc:
        print(f"bento server: {exc}", file=sys.stderr)
        return 2
    args = resolved.args
    if args.hash_key:
        return hash_key()
    config = build_config(resolved)
    events.configure(args.log_level, args.log_format)
    try:
        config.check()
    except ValueError as exc:
        print(f"bento server: {exc}", file=sys.stderr)
        return 2
    if config.tls_cert and config.tls_key:
        problem = tls_problem(config.tls_cert, config.tls_key)
        if problem:
            print(f"bento server: TLS: {problem}", file=sys.stderr)
            return 2
    import bento_sandbox

    if args.sandbox_cmd:
        config.sandbox, config.sandbox_cmd = "cmd", args.sandbox_cmd
    elif config.sandbox == "auto":
        config.sandbox = bento_sandbox.default_backend()
    try:
        bento_sandbox.get_backend(config.sandbox, config.sandbox_cmd)
    except bento_sandbox.SandboxUnavailable as exc:
        print(f"bento server: {exc}", file=sys.stderr)
        return 2
    config.enforceable = bento_sandbox.enforcement()
    config.allow_unenforced_limits = args.allow_unenforced_limits
    builtin = {**DEFAULT_LIMITS, **(BWRAP_LIMITS if config.sandbox == "bwrap" else {})}
    unheld = [k for k in builtin if k not in config.enforceable]
    config.default_limits = {k: v for k, v in builtin.items() if k in config.enforceable}
    try:
        given = settings.parse_limits(args.default_limit)
        maxima = settings.parse_limits(args.max_limit)
    except ValueError as exc:
        print(f"bento server: --default-limit/--max-limit: {exc}", file=sys.stderr)
        return 2
    if not config.allow_unenforced_limits:
        for option, items in (("--default-limit", given), ("--max-limit", maxima)):
            for k, v in items.items():
                if v is not None and k not in config.enforceable:
                    print(f"bento server: {option} {k}: this machine cannot enforce {k} "
                          f"({bento_sandbox.unenforceable_reason(k)}); leave it out, or start with "
                          "--allow-unenforced-limits to accept it unenforced", file=sys.stderr)
                    return 2
    config.max_limits = {k: v for k, v in maxima.items() if v is not None}
    merged: dict[str, float | None] = {**config.default_limits, **given}
    # What an execute that asks for nothing gets: never above a maximum, and
    # a limit with a maximum is always set (as config.session_limits does).
    defaults = {k: v for k, v in merged.items() if v is not None}
    for k, top in config.max_limits.items():
        defaults[k] = min(defaults.get(k, top), top)
    config.default_limits = defaults
    unheld = [k for k in unheld if k not in given]
    try:
        config.quotas = quotas_of(resolved)
    except ValueError as exc:
        print(f"bento server: {exc}", file=sys.stderr)
        return 2
    if config.cluster:
        try:
            from bento.cluster.node import cannot_start
        except ImportError as exc:
            print(f"bento server: --cluster needs coredis ({exc}): pip install 'bento-server[cluster]' "
                  "(make install does)", file=sys.stderr)
            return 2
        why = cannot_start(config)
        if why:
            print(f"bento server: --cluster: {why} (docs/cluster.md)", file=sys.stderr)
            return 2
    from bento.store import DataDirBusy, lock_data_dir

    try:
        lock = lock_data_dir(config.data_dir)
    except DataDirBusy as exc:
        print(f"bento server: {exc}", file=sys.stderr)
        return 2
    from bento.gate import machine_capacity

    config.capacity = machine_capacity(
        config.data_dir, config.default_limits.get("memory_bytes"), max_running=args.max_sessions,
        memory_budget=args.memory_budget, disk_floor=args.disk_floor, max_queued=args.max_queued)
    try:
        stopped_by = trio_run(serve_until_signal, config, argv, unheld)
    finally:
        os.close(lock)
    events.emit("server.stopped", signal=stopped_by)
    print(f"bento: stopped ({stopped_by})", flush=True)
    return 0


def trio_run(fn: Any, *args: Any) -> str:
    """``trio.run(fn, *args)``; a Ctrl-C that arrives before trio's own handler is
    in place ends it as an interrupt, not as a traceback."""
    import trio

    try:
        return trio.run(fn, *args)
    except KeyboardInterrupt:
        return "INT"
    except BaseExceptionGroup as group:
        if group.split(KeyboardInterrupt)[1] is None:
            return "INT"
        raise


async def serve_until_signal(config: Config, argv: list[str], unheld: list[str]) -> str:
    """Serve until SIGINT or SIGTERM (returns its name); SIGHUP reloads the API keys and quotas."""
    import trio

    from bento.server import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(serve, config)
            say_started(config, ws_server.port, unheld)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    reload_keys(config, argv)
                    continue
                nursery.cancel_scope.cancel()
                return signal.Signals(signum).name.removeprefix("SIG")
    return "cancelled"


def reload_keys(config: Config, argv: list[str]) -> None:
    """Read the config file and key files again and take their keys and quotas
    (nothing else: other settings need a restart). A file that cannot be used
    keeps the old keys and quotas."""
    try:
        resolved = resolve(argv)
        quotas = quotas_of(resolved)
    except (ValueError, SystemExit) as exc:
        events.emit("server.reload_failed", logging.ERROR, reason=str(exc), kept="the previous keys and quotas")
        return
    config.quotas.replace(quotas.default, quotas.by_key)
    before = {k.hash: k.name for k in config.key_list()}
    config.api_keys, config.named_keys = resolved.plain_keys, resolved.file.named_keys
    config.revoke_sessions = resolved.file.revoke_sessions
    config.keys.replace(config.key_list())
    gone = sorted(name for h, name in before.items() if not config.keys.known(h))
    events.emit("server.reloaded", keys=len(config.key_list()), revoked=",".join(gone) or "none",
                revoke_sessions=config.revoke_sessions, quotas=len(quotas.by_key))


def say_started(config: Config, port: int, unheld: list[str]) -> None:
    import bento_sandbox

    scheme = "wss" if config.tls_cert else "ws"
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"bento: listening on {scheme}://{host}:{port}/v1", flush=True)
    print(f"bento: data dir {os.path.abspath(config.data_dir)}", flush=True)
    print(f"bento: sandbox {config.sandbox}", flush=True)
    cap = config.capacity
    assert cap is not None  # set by run_server before the server starts
    print(f"bento: capacity {cap.max_running} running functions, memory budget "
          f"{cap.memory_budget >> 20} MiB (a function without a memory limit counts "
          f"{cap.default_memory >> 20} MiB), disk floor {cap.disk_floor >> 20} MiB, "
          f"queue {cap.max_queued}", flush=True)
    if config.sandbox != "bwrap":
        print(f"bento: WARNING sandbox '{config.sandbox}': functions run UNSANDBOXED "
              "as this user", flush=True)
    held = "; ".join(f"{k} by {how}" for k, how in sorted(config.enforceable.items()))
    print(f"bento: limits enforced: {held}", flush=True)
    defaults = ", ".join(f"{k}={units.limit_text(k, v)}" for k, v in sorted(config.default_limits.items()))
    print(f"bento: default limits: {defaults or 'none'}", flush=True)
    missing = sorted(set(bento_sandbox.Limits.KEYS) - set(config.enforceable))
    if missing:
        what = ("accepted, held per process at most (--allow-unenforced-limits)"
                if config.allow_unenforced_limits else "refused")
        print(f"bento: WARNING limits this machine cannot enforce: {', '.join(missing)} "
              f"({'; '.join(bento_sandbox.unenforceable_reason(k) for k in missing)}): "
              f"executes asking for them are {what}", flush=True)
    if unheld:
        print(f"bento: WARNING no default {' or '.join(unheld)} limit: this machine cannot "
              "enforce it, so sessions can take the host's processes, memory or CPU", flush=True)
    events.emit("server.started", url=f"{scheme}://{host}:{port}/v1", data_dir=os.path.abspath(config.data_dir),
                sandbox=config.sandbox, keys=len(config.key_list()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        return run_server(argv[1:])
    if argv[:1] == ["env"]:
        from bento.envs_cli import main as env_main

        return env_main(argv[1:])
    try:
        from bento_clients.cli import main as client_main
    except ImportError:
        print("bento: the client commands are not built yet; only 'bento server' works", file=sys.stderr)
        return 2
    return client_main(argv)


if __name__ == "__main__":
    sys.exit(main())
