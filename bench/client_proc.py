"""``tunnel-client start-tunnel INSTANCE PORT --local-host-port=localhost:0
--disable-connection-check --access-token-file F --ca-file C``, with the event loop chosen on
the command line (the CLI always takes uvloop when it is installed). The same library calls as
the CLI: ``token_provider``, ``ConnectOptions``, ``LocalListener``; prints the CLI's
``Listening on port [N].`` line.

    python -m bench.client_proc --server wss://127.0.0.1:P --port TARGET_PORT \
        --token-file F [--ca-file C] --loop {uvloop,asyncio}
"""

from __future__ import annotations

import argparse
import ssl
import sys
from pathlib import Path

from tunnel_client.listener import LocalListener
from tunnel_client.session import ConnectOptions
from tunnel_client.tokens import token_provider
from tunnel_protocol.urls import InstanceTarget
from tunnel_runtime.loop import run

PROJECT, ZONE, INSTANCE = "p", "z", "vm"


async def listen(options: ConnectOptions) -> None:
    listener = LocalListener(options, "localhost", 0, report=lambda m: print(m, file=sys.stderr))
    port = await listener.start()
    print(f"Listening on port [{port}].", flush=True)
    await listener.serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--ca-file", type=Path)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    context = ssl.create_default_context(cafile=str(args.ca_file) if args.ca_file else None)
    options = ConnectOptions(
        server=args.server,
        target=InstanceTarget(PROJECT, ZONE, INSTANCE, "nic0", args.port),
        token=token_provider(args.token_file, server=args.server, credential_file=None),
        ssl_context=context,
    )
    try:
        run(listen(options), use_uvloop=args.loop == "uvloop")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
