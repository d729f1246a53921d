"""``bento env ls`` and ``bento env rm``: the operator's view of a data dir's environments.

They act on the data dir directly (run them on the server's machine, as the
user the server runs as), like ``bento server``; the protocol has no op for
them. An environment that a running session uses is never removed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bento import envs
from bento.config import default_data_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bento env", description="The environments of executes' packages.")
    p.add_argument("--data-dir", default=default_data_dir(), help="the server's data dir")
    # --data-dir before or after the command (SUPPRESS: the command's only when given).
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", default=argparse.SUPPRESS, help="the server's data dir")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", parents=[data_dir], help="list the environments, least recently used first")
    ls.add_argument("--json", action="store_true", help="one JSON array")
    rm = sub.add_parser("rm", parents=[data_dir], help="remove environments (not one a running session uses)")
    rm.add_argument("names", nargs="+", metavar="NAME", help="an environment's name (from ls)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    envs_dir = os.path.join(args.data_dir, "envs")
    if args.command == "ls":
        found = sorted(envs.listing(envs_dir), key=lambda e: e["last_used"])
        if args.json:
            print(json.dumps(found))
            return 0
        for e in found:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
            busy = "  (in use)" if e["in_use"] else ""
            print(f"{e['name']}  {e['bytes'] / 1e6:8.1f} MB  used {used}  {' '.join(e['specs'])}{busy}")
        if not found:
            print(f"no environments in {envs_dir}", file=sys.stderr)
        return 0
    code = 0
    for name in args.names:
        if not name.isalnum():
            print(f"bento env: {name!r} is not an environment name (see 'bento env ls')", file=sys.stderr)
            code = 1
            continue
        try:
            removed = envs.remove(envs_dir, name)
        except FileNotFoundError:
            print(f"bento env: no environment {name} in {envs_dir}", file=sys.stderr)
            code = 1
            continue
        if not removed:
            print(f"bento env: {name} is in use by a running session; not removed", file=sys.stderr)
            code = 1
    return code
