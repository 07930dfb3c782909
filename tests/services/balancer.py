"""A TCP load balancer in front of several servers, as a test fixture: each new connection goes to the
server with the fewest open connections (ties: the first listed), skipping servers that refuse; run as
``python balancer.py --port P HOST:PORT...``. It prints ``CONN <backend>`` for every connection it relays."""

from __future__ import annotations

import argparse
import asyncio
import contextlib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("backends", nargs="+", help="HOST:PORT")
    args = parser.parse_args()
    backends = [(h, int(p)) for h, _, p in (b.rpartition(":") for b in args.backends)]
    open_to = dict.fromkeys(backends, 0)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        for backend in sorted(backends, key=lambda b: open_to[b]):
            try:
                server_r, server_w = await asyncio.open_connection(*backend)
            except OSError:
                continue
            print(f"CONN {backend[0]}:{backend[1]}", flush=True)
            open_to[backend] += 1
            try:
                await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))
            finally:
                open_to[backend] -= 1
            return
        client_w.close()

    async def serve() -> None:
        server = await asyncio.start_server(relay, "127.0.0.1", args.port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
