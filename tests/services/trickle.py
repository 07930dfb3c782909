"""A TCP relay that delivers what the server says in small pieces with pauses, as a long real path does.

On loopback a response arrives in one piece, so code that reads a body with one ``read(n)`` passes every test
and fails on the first real link. Here every answer (what the server sends after the client last spoke) is
written to the client in ``--piece``-byte writes, ``--pause`` seconds apart, with ``TCP_NODELAY`` so each write
is its own segment. Past ``--slow-bytes`` of one answer, the rest goes on in 16 KiB writes without pauses, so
blobs still move at a useful speed while every header, token and manifest comes in pieces.

Run as ``python trickle.py --port P --to HOST:PORT``; it prints ``CONN`` for every accepted connection and
``ANSWER <bytes>`` when an answer's first bytes were trickled, so a test can assert the pieces were real.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

FAST_PIECE = 16 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--to", required=True, help="HOST:PORT of the server")
    parser.add_argument("--piece", type=int, default=100)
    parser.add_argument("--pause", type=float, default=0.002)
    parser.add_argument("--slow-bytes", type=int, default=16 * 1024)
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        print("CONN", flush=True)
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        for writer in (client_w, server_w):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answered = [0]  # bytes of the current answer sent so far; reset when the client speaks

        async def upstream() -> None:
            while data := await client_r.read(65536):
                answered[0] = 0
                server_w.write(data)
                await server_w.drain()
            server_w.write_eof()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                view = memoryview(data)
                while view:
                    slow = answered[0] < args.slow_bytes
                    n = args.piece if slow else FAST_PIECE
                    client_w.write(bytes(view[:n]))
                    await client_w.drain()
                    answered[0] += min(n, len(view))
                    view = view[n:]
                    if slow:
                        if answered[0] >= args.slow_bytes or not view:
                            print(f"ANSWER {answered[0]}", flush=True)
                        await asyncio.sleep(args.pause)
            client_w.close()

        try:
            await asyncio.gather(upstream(), downstream())
        except (OSError, RuntimeError):
            pass
        finally:
            client_w.close()
            server_w.close()

    async def serve() -> None:
        server = await asyncio.start_server(relay, "127.0.0.1", args.port, reuse_address=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
