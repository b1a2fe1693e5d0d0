"""The relay as ``tunnel-server serve`` runs it, with the event loop chosen on the command line
(the CLI always takes uvloop when it is installed): the same ``load_config``,
``setup_logging`` and ``serve_forever`` calls, then ``runtime.run(..., use_uvloop=...)``.

    python -m bench.relay_proc CONFIG.yaml --loop {uvloop,asyncio}
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunnel_runtime.loop import run
from tunnel_server.config import load_config
from tunnel_server.ops.logs import setup_logging
from tunnel_server.serve import serve_forever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    config = load_config(args.config)
    setup_logging(config.log_format)
    run(serve_forever(config, args.config), use_uvloop=args.loop == "uvloop")


if __name__ == "__main__":
    main()
