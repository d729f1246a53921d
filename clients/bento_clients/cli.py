"""The ``bento`` command for people: run, attach, logs, send, status, kill, rm, ls, share.

``bento.app`` hands every subcommand except ``server`` to ``main(argv)``.
Documentation: docs/cli.md. This module parses the arguments and dispatches;
the commands live in ``cli_commands`` and ``cli_ls``, streaming in
``cli_stream``, what is shown in ``cli_output``, settings in ``cli_settings``.
The CLI talks to the server only through the async SDK and keeps what must
survive its own death (positions, unacknowledged input) in the local state
file (``bento_clients.state``).

Exit codes: ``run``/``attach``/``logs -f`` return the function's (0 ok, 1 an
exception, n for ``sys.exit(n)``, 128+n when killed by signal n); 2 is a
usage error (bad arguments, bad JSON, unreadable file); other failures of
bento itself are 125 for the streaming commands and 1 for the others.
User mistakes get one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from bento_clients import sdk
from bento_clients.cli_commands import (
    cmd_attach,
    cmd_kill,
    cmd_logs,
    cmd_rm,
    cmd_run,
    cmd_send,
    cmd_share,
    cmd_status,
    cmd_tokens,
)
from bento_clients.cli_files import cmd_cp
from bento_clients.cli_ls import cmd_ls
from bento_clients.cli_output import (
    exit_code,
    exit_message,
    one_line,
    render,
    say,
    setup_logging,
    unauthorized_message,
)
from bento_clients.cli_settings import (
    EXIT_BENTO,
    EXIT_USAGE,
    Settings,
    UsageError,
    load_config,
    normalize_url,
    settings_from,
)
from bento_clients.errors import (
    BentoError,
    Busy,
    Forbidden,
    NotFound,
    QuotaExceeded,
    RequestFailed,
    Unauthorized,
    Unavailable,
)
from bento_clients.terminal import DEFAULT_DETACH_KEYS

__all__ = ["EXIT_BENTO", "UsageError", "build_parser", "exit_code", "exit_message", "load_config", "main",
           "normalize_url", "render"]

STREAMING = ("run", "attach", "logs")
EXIT_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool that SIGPIPE ended


# --------------------------------------------------------------------------
# Argument parsing.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--server", default=argparse.SUPPRESS,
                   help="server address; for a session this machine knows, overrides the server it was started "
                        "on (default: $BENTO_SERVER, the config file, ws://127.0.0.1:8765/v1)")
    g.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (default: $BENTO_API_KEY, the config file)")
    g.add_argument("--ca-file", default=argparse.SUPPRESS, metavar="PEM",
                   help="CA certificates that verify a wss:// server (default: $BENTO_CA_FILE, the config file, "
                        "the system's)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    g.add_argument("--state-file", default=argparse.SUPPRESS,
                   help="local state file (default: $BENTO_CLIENT_STATE or ~/.local/state/bento-client/state.json)")
    g.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: ~/.config/bento/config.toml)")
    g.add_argument("--connect-timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                   help="seconds to keep trying the first connection (default 10)")
    g.add_argument("--reconnect-timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                   help="seconds to keep trying after a dropped connection (default 60)")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="say on stderr when the connection drops and comes back")


SESSION_HELP = "owner or viewer token, or the id or --name of a session this machine knows"
OWNER_HELP = "owner token (bto_...), or the id or --name of a session this machine started"


def build_parser() -> dict[str, argparse.ArgumentParser]:
    """One parser per command (parsed with intermixed options)."""
    parsers: dict[str, argparse.ArgumentParser] = {}

    def make(name: str, help: str) -> argparse.ArgumentParser:
        p = _Parser(prog=f"bento {name}", description=help)
        _common(p)
        parsers[name] = p
        return p

    p = make("run", "Run FILE.py's entry (or a project directory's module) on the server and attach to it.")
    p.add_argument("file", help="the Python file (a module defining the entry), or a project directory (-m)")
    p.add_argument("args", nargs="*", help="arguments for the entry, each as JSON ('3', '\"text\"', '[1,2]'); "
                                           "@path: the JSON in that file")
    p.add_argument("-m", "--module", metavar="PKG.MODULE[:ENTRY]",
                   help="with a directory: the module to import from it (and its entry)")
    p.add_argument("--file", dest="add_file", action="append", default=[], metavar="SRC[:DEST]",
                   help="put a file (or a directory's tree) into the function's working directory (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave matching files out of a directory sent (repeatable; .gitignore is read too)")
    p.add_argument("--name", help="a name for the session on this machine, usable wherever a token is "
                                  "(unique here; letters, digits, . _ -)")
    p.add_argument("--entry", default="main", help="the function to call (default main)")
    p.add_argument("--kwarg", action="append", default=[], metavar="NAME=JSON", help="a keyword argument (repeatable)")
    p.add_argument("-d", "--detach", action="store_true", help="start it, print the tokens and return at once")
    p.add_argument("--limit", action="append", default=[], metavar="SPEC",
                   help="limits, e.g. wall=30s,mem=256M,cpu=10s,out=1M,pids=64")
    p.add_argument("--network", action="store_true", help="allow network access")
    p.add_argument("--pip", action="append", default=[], metavar="SPEC",
                   help="a package the function imports, e.g. numpy or 'pandas<3' (repeatable; installed "
                        "by the server once per distinct set)")
    p.add_argument("--requirements", "-r", metavar="FILE",
                   help="packages from a requirements file (one per line; # comments)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable (repeatable)")
    p.add_argument("--idempotency-key", metavar="KEY", help="run at most once per key (default: a fresh key)")
    p.add_argument("--wait", nargs="?", type=float, const=True, default=False, metavar="SECONDS",
                   help="when the server is full, wait for capacity in its queue (default up to 600 s) "
                        "instead of failing at once")
    p.add_argument("--buffer", metavar="SIZE", help="output buffer size, e.g. 64M (default: the server's)")
    p.add_argument("--policy", choices=["block", "drop_oldest", "fail"],
                   help="what a full buffer does: block the function, drop the oldest output, or fail "
                        "(default: the server's)")
    _stream_options(p)

    p = make("attach", "Attach to a session, from where this machine left off.")
    p.add_argument("token", help=SESSION_HELP)
    p.add_argument("--from", dest="from_seq", type=int, metavar="SEQ", help="start at this frame seq instead")
    _stream_options(p)

    p = make("logs", "Print a session's retained output (read-only; a viewer token works).")
    p.add_argument("token", help=SESSION_HELP)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the end")
    p.add_argument("--from", dest="from_seq", type=int, default=1, metavar="SEQ",
                   help="start at this frame seq (default 1)")
    p.add_argument("--traceback", action="store_true", help="print the whole remote traceback of an exception")

    p = make("send", "Send one input value to a session (owner token).")
    p.add_argument("token", help=OWNER_HELP)
    p.add_argument("value", nargs="?", help="the value as JSON (a bare word is an error: quote strings)")
    p.add_argument("--str", dest="text", action="store_true", help="send VALUE as a plain string, not JSON")
    p.add_argument("--eof", action="store_true", help="close the function's input instead")
    p.add_argument("--stdin", action="store_true",
                   help="write to the function's standard input: VALUE and a newline, or with VALUE '-' "
                        "this command's own stdin as it is (--eof closes the function's stdin)")

    p = make("cp", "Copy a file between this machine and a session's working directory.")
    p.add_argument("src", help="TOKEN:path (download; any token) or a local file (upload; owner token)")
    p.add_argument("dst", help="a local path, or TOKEN:path")

    p = make("status", "Show a session's state.")
    p.add_argument("token", help=SESSION_HELP)

    p = make("kill", "Send a signal to the function (owner token).")
    p.add_argument("token", help=OWNER_HELP)
    p.add_argument("--signal", "-s", default="TERM", type=str.upper, choices=["INT", "TERM", "KILL"],
                   help="INT (the function sees KeyboardInterrupt), TERM (default) or KILL")

    p = make("rm", "Destroy a session: kill it, delete its output, forget it here (owner token).")
    p.add_argument("token", help=OWNER_HELP)

    p = make("ls", "List the sessions this machine knows, and those the server lists for the API key.")
    p.add_argument("--prune", action="store_true",
                   help="forget the sessions that have ended (their tokens are dropped from the state file)")

    p = make("share", "Print a session's viewer token (read-only access to share).")
    p.add_argument("token", help=SESSION_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rotate", action="store_true",
                   help="replace the viewer token (owner only): the old one stops working, its viewers are cut off")
    g.add_argument("--revoke", action="store_true", help="take the viewer token away, giving no new one (owner only)")

    p = make("tokens", "Print a session's id, owner token and viewer token, as recorded on this machine.")
    p.add_argument("token", help=SESSION_HELP)
    return parsers


def _stream_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detach-keys", default=None, metavar="KEYS",
                   help=f"key sequence that detaches (default {DEFAULT_DETACH_KEYS})")
    p.add_argument("--no-stdin", action="store_true", help="do not send the terminal's input to the function")
    p.add_argument("-t", "--tty", action="store_true",
                   help="a terminal: run in one (run), or pass keys through to it (attach); keys go as typed")
    p.add_argument("--recv", action="store_true",
                   help="send each input line as a text value for api.recv() (default: the function's stdin)")
    p.add_argument("--traceback", action="store_true", help="print the whole remote traceback of an exception")


HELP = """usage: bento COMMAND [options]

commands:
  run FILE.py [ARGS...]   run a function and attach (-d: detach at once; -t: in a terminal; --name NAME)
  run DIR -m PKG.MOD      run a project's module (--file, --pip, -r requirements.txt)
  attach SESSION          attach, from where this machine left off
  logs SESSION [-f]       print retained output (read-only)
  send SESSION VALUE      send one input value (JSON; --stdin: a line of the function's stdin)
  cp SESSION:path LOCAL   copy a file out of a session (or LOCAL SESSION:path into it)
  status SESSION          show a session's state
  kill SESSION [-s SIG]   signal the function (INT, TERM, KILL)
  rm SESSION              destroy a session
  ls [--prune]            sessions this machine knows (--prune: forget ended ones)
  share SESSION           print the viewer token
  tokens SESSION          print the session's tokens again
  server                  run a server (bento server --help)
  env ls | env rm NAME    the environments of executes' packages (on the server's machine)

SESSION is a token (bto_... owner, btv_... viewer), or the id or --name of a
session this machine knows. Run 'bento COMMAND --help' for a command's
options. Docs: docs/cli.md.
"""


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], Awaitable[int]]] = {
    "run": cmd_run, "attach": cmd_attach, "logs": cmd_logs, "send": cmd_send, "status": cmd_status,
    "kill": cmd_kill, "rm": cmd_rm, "ls": cmd_ls, "share": cmd_share, "tokens": cmd_tokens, "cp": cmd_cp,
}


# --------------------------------------------------------------------------
# Errors as one line.


def _leaf(group: BaseExceptionGroup) -> BaseException:
    """The exception that matters in a group from nurseries (the first that is
    not a cancellation)."""
    found = sdk.leaf_exceptions(group)
    return next((e for e in found if not isinstance(e, trio.Cancelled)), found[0])


def describe_error(exc: BaseException, key_sent: bool, waited: bool = False) -> str:
    """One line for an error the user can do something about (``key_sent``:
    whether this command gave the server an API key; ``waited``: it ran with --wait)."""
    if isinstance(exc, NotFound):
        if exc.details.get("replaced") is True:
            return exc.message  # a viewer token its owner replaced: the server says so
        return "no session has this token (a wrong token, or the session ended and was cleaned up)"
    if isinstance(exc, Forbidden):
        return "this needs the owner token (bto_...), not a viewer token"
    if isinstance(exc, Unauthorized):
        return exc.message if exc.details.get("revoked") is True else unauthorized_message(key_sent)
    if isinstance(exc, Busy):
        later = "with a longer --wait" if waited else "or run with --wait"
        when = "" if exc.retry_after is None else f"; try again in {exc.retry_after:g} s, {later}"
        return f"the server is full ({exc.limit}): {exc.message}{when}"
    if isinstance(exc, QuotaExceeded):
        when = "" if exc.retry_after is None else f"; allowed again in {exc.retry_after:g} s"
        return f"this API key is over its {exc.quota} quota: {exc.message}{when}"
    if isinstance(exc, Unavailable):
        return f"the cluster is unavailable from this node: {exc.message}"
    if isinstance(exc, RequestFailed):
        return f"the server refused: {exc.code}: {exc.message}"
    return one_line(str(exc)) or type(exc).__name__


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: its reader has gone, and the interpreter's own
    flush at exit must not fail again (and print a traceback)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str]) -> int:
    """Run one ``bento`` command; returns the process exit code."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(HELP)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    parsers = build_parser()
    if command not in parsers:
        say(f"bento: unknown command {command!r}\n{HELP}")
        return EXIT_USAGE
    failure = EXIT_BENTO if command in STREAMING else 1
    settings: Settings | None = None
    args: Any = None
    try:
        try:
            args = parsers[command].parse_intermixed_args(rest)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        settings = settings_from(args)
        setup_logging(settings.verbose)
        try:
            return trio.run(COMMANDS[command], settings, args)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
    except UsageError as exc:
        say(f"bento: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (``bento attach T | head -3``):
        # end quietly, as other Unix tools do. Frames not written are not
        # recorded, so a later attach shows them.
        _quiet_stdout()
        return EXIT_PIPE
    except (BentoError, OSError) as exc:
        key_sent = settings is not None and settings.api_key is not None
        say(f"bento: {describe_error(exc, key_sent, waited=bool(getattr(args, 'wait', False)))}")
        return failure
    finally:
        for warning in settings.state.warnings if settings is not None else ():
            say(f"bento: warning: {warning}")
