"""The running agent's own entry: ``python -m ipop_switch.agent -c CONFIG [--pidfile PATH]``.

``ipop-switch up`` checks its arguments and the config, then replaces itself with this
(``os.execv``: the same pid, so pid files, systemd and a parent's handle stay valid). The
node then runs for months without the CLI's imports (click, rich and every command's module,
~14 MB RSS) that it never uses. Errors are one line and a non-zero exit, as from the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import IpopError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ipop-switch up", description="run the node until SIGTERM or Ctrl-C")
    ap.add_argument("-c", "--config", required=True, help="node config (TOML)")
    ap.add_argument("--pidfile", help="write the agent's pid here")
    a = ap.parse_args(argv)
    try:
        return _run(a.config, a.pidfile)
    except IpopError as e:
        print(f"ipop-switch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ipop-switch: interrupted", file=sys.stderr)
        return 130


def _run(config_path: str, pidfile: str | None) -> int:
    # slixmpp colours its debug XML with pygments when it can import it (rich brings it along):
    # a lexer and formatter tables the agent never prints, 3 MB. An absent module is its fallback.
    sys.modules.setdefault("pygments", None)   # type: ignore[arg-type]
    import asyncio

    from ..config import load_config
    from ..proc import require_root
    from .logs import setup_logging
    from .node import Node

    cfg = load_config(config_path)
    require_root()
    setup_logging(cfg.node.log_level)      # one line per event; journald's timestamps under systemd
    if pidfile:
        Path(pidfile).write_text(f"{os.getpid()}\n")
    try:
        import uvloop  # the faster event loop, when present
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(Node(cfg, config_path=config_path).run())
    finally:
        if pidfile:
            Path(pidfile).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
