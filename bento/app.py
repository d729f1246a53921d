"""The ``bento`` command: ``bento server`` runs a server; the other commands are
the client CLI (``bento_clients.cli``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bento.config import Config, default_data_dir


def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bento server", description="Run a Bento server.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--data-dir", default=default_data_dir(), help="where sessions and functions live")
    p.add_argument("--sandbox", default="auto", choices=["auto", "bwrap", "none", "cmd"],
                   help="environment backend (default auto: bwrap when it works here, else none)")
    p.add_argument("--sandbox-cmd", help="run the driver behind this command prefix (implies --sandbox cmd)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require this API key for store/execute/list (repeatable; also BENTO_API_KEYS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without API keys")
    p.add_argument("--tls-cert", help="certificate (PEM) to serve wss://")
    p.add_argument("--tls-key", help="private key (PEM) for --tls-cert")
    p.add_argument("--ttl", type=float, default=24 * 3600.0,
                   help="seconds an unattached session lives (default 86400)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close connections silent this long (default 300 s)")
    p.add_argument("--handshake-timeout", type=float, default=10.0,
                   help="close connections that do not say hello this fast (default 10 s)")
    p.add_argument("--max-message", type=int, default=16 * 1024 * 1024,
                   help="largest message in either direction, bytes (default 16 MiB)")
    p.add_argument("--max-buffer-bytes", type=int, default=1024 * 1024 * 1024,
                   help="largest buffer.max_bytes an execute may ask for (default 1 GiB)")
    p.add_argument("--send-timeout", type=float, default=30.0,
                   help="drop a client that does not read a message this long (default 30 s)")
    p.add_argument("--buffer-bytes", type=int, default=64 * 1024 * 1024,
                   help="default output buffer per session (default 64 MiB)")
    p.add_argument("--buffer-policy", default="block", choices=["block", "drop_oldest", "fail"])
    p.add_argument("--default-limit", action="append", default=[], metavar="KEY=VALUE",
                   help="a limit for executes that do not set it (repeatable; KEY=none removes "
                        "a built-in default). Built in with bwrap: pids=256, memory_bytes=1GiB")
    p.add_argument("--max-limit", action="append", default=[], metavar="KEY=VALUE",
                   help="the most an execute may ask for (repeatable); a limit with a maximum "
                        "is always in force, at most that value")
    p.add_argument("--allow-unenforced-limits", action="store_true",
                   help="accept limits this machine cannot hold for a whole environment (no "
                        "cgroup for them): they get a per-process rlimit or nothing, and status "
                        "says so. Without it such limits are refused")
    p.add_argument("--pool", type=int, default=2,
                   help="fresh environments kept started ahead of time for fast executes, never reused "
                        "(bwrap and none; default 2; 0 = off)")
    p.add_argument("--max-env-bytes", type=int, default=4 * 1024 * 1024 * 1024,
                   help="bytes the environments of executes' packages may take together under the data "
                        "dir (default 4 GiB); the least recently used go first")
    p.add_argument("--max-work-bytes", type=int, default=1024 * 1024 * 1024,
                   help="disk a function may fill in its work dir (its home, kept after the run; default "
                        "1 GiB): over it, it is killed (LimitExceeded work_bytes)")
    p.add_argument("--max-upload-bytes", type=int, default=256 * 1024 * 1024,
                   help="the largest file a client may put into a running session (default 256 MiB)")
    p.add_argument("--node", default="node-1", help="this node's name, sent in hello")
    p.add_argument("--log-level", default="INFO")
    return p


def parse_limits(items: list[str]) -> dict[str, float | None]:
    from bento import protocol

    out: dict[str, float | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in protocol.LIMIT_KEYS:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {sorted(protocol.LIMIT_KEYS)}")
        if value.lower() == "none":
            out[key] = None
            continue
        number = float(value)
        if number < 0 or number != number:
            raise ValueError(f"{item!r}: the value must be a non-negative number")
        out[key] = number if key in ("wall_s", "cpu_s") else int(number)
    return out


def run_server(argv: list[str]) -> int:
    args = server_parser().parse_args(argv)
    keys = list(args.api_key)
    env_keys = os.environ.get("BENTO_API_KEYS", "")
    keys += [k.strip() for k in env_keys.split(",") if k.strip()]
    config = Config(
        host=args.host, port=args.port, data_dir=args.data_dir, sandbox=args.sandbox,
        api_keys=keys, insecure=args.insecure, tls_cert=args.tls_cert, tls_key=args.tls_key,
        ttl_s=args.ttl, idle_timeout_s=args.idle_timeout, send_timeout_s=args.send_timeout,
        buffer_bytes=args.buffer_bytes, buffer_policy=args.buffer_policy, node=args.node,
        handshake_timeout_s=args.handshake_timeout, max_message=args.max_message,
        max_buffer_bytes=args.max_buffer_bytes, pool_size=args.pool, max_env_bytes=args.max_env_bytes,
        max_work_bytes=args.max_work_bytes, max_upload_bytes=args.max_upload_bytes,
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config.check()
    except ValueError as exc:
        print(f"bento server: {exc}", file=sys.stderr)
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
    unheld: list[str] = []
    if config.sandbox == "bwrap":
        # Without these a session that asks for nothing could take the host's
        # pids and memory (tmpfs writes are charged to the memory cgroup).
        builtin = {"pids": 256, "memory_bytes": 1024 * 1024 * 1024}
        unheld = [k for k in builtin if k not in config.enforceable]
        config.default_limits = {k: v for k, v in builtin.items() if k in config.enforceable}
    try:
        given = parse_limits(args.default_limit)
        maxima = parse_limits(args.max_limit)
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
    config.default_limits = {k: v for k, v in merged.items() if v is not None}
    from bento.store import DataDirBusy, lock_data_dir

    try:
        lock = lock_data_dir(config.data_dir)
    except DataDirBusy as exc:
        print(f"bento server: {exc}", file=sys.stderr)
        return 2

    import trio

    from bento.server import serve

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(serve, config)
            port = ws_server.port
            scheme = "wss" if config.tls_cert else "ws"
            host = f"[{config.host}]" if ":" in config.host else config.host
            print(f"bento: listening on {scheme}://{host}:{port}/v1", flush=True)
            print(f"bento: data dir {os.path.abspath(config.data_dir)}", flush=True)
            print(f"bento: sandbox {config.sandbox}", flush=True)
            if config.sandbox != "bwrap":
                print(f"bento: WARNING sandbox '{config.sandbox}': functions run UNSANDBOXED "
                      "as this user", flush=True)
            held = "; ".join(f"{k} by {how}" for k, how in sorted(config.enforceable.items()))
            print(f"bento: limits enforced: {held}", flush=True)
            missing = sorted(set(bento_sandbox.Limits.KEYS) - set(config.enforceable))
            if missing:
                what = ("accepted, held per process at most (--allow-unenforced-limits)"
                        if config.allow_unenforced_limits else "refused")
                print(f"bento: WARNING limits this machine cannot enforce: {', '.join(missing)} "
                      f"({'; '.join(bento_sandbox.unenforceable_reason(k) for k in missing)}): "
                      f"executes asking for them are {what}", flush=True)
            if unheld:
                print(f"bento: WARNING no default {' or '.join(unheld)} limit: sessions can take "
                      "the host's processes and memory", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    finally:
        os.close(lock)
    return 0


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
