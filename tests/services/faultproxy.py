"""An HTTP proxy in front of the upstream registry that misbehaves on purpose, run as a subprocess.

--rate B/s throttles blob bodies; --flip-byte flips one byte in the middle of every blob body; --flip-once flips
one byte in the middle of the first ranged (206) blob body only (one bad chunk);
--cut-after N closes the connection after N bytes of a blob body; --manifest-status S answers every manifest
request with status S; --manifest-stall T holds manifest requests T seconds before passing them on; --no-range drops the
Range header of blob requests (an upstream that ignores Range); --ratelimit-remaining V adds Docker Hub's
header to manifest answers. Every request is printed as
``REQ <method> <path>`` when it arrives, and every blob GET as
``BLOB GET <path> <upstream status> range=<Range header or ->``, and when its body ends (or breaks)
``BLOB SENT <path> <bytes>``, so tests see what the mirror asked for and got.
Anything else passes through unchanged.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--flip-byte", action="store_true")
    parser.add_argument("--flip-once", action="store_true")
    parser.add_argument("--cut-after", type=int, default=-1)
    parser.add_argument("--manifest-status", type=int, default=0)
    parser.add_argument("--manifest-stall", type=float, default=0)
    parser.add_argument("--no-range", action="store_true")
    parser.add_argument("--ratelimit-remaining", default="")
    args = parser.parse_args()
    flipped = False

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal flipped
        session: aiohttp.ClientSession = request.app["session"]
        print(f"REQ {request.method} {request.path}", flush=True)
        if "/manifests/" in request.path:
            if args.manifest_status:
                return web.json_response(
                    {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}, status=args.manifest_status
                )
            await asyncio.sleep(args.manifest_stall)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        is_blob_get = request.method == "GET" and "/blobs/" in request.path
        if is_blob_get and args.no_range:
            headers.pop("Range", None)
        body = await request.read()
        async with session.request(
            request.method, args.upstream + request.path_qs, headers=headers, data=body or None, allow_redirects=False
        ) as up:
            if is_blob_get:
                print(f"BLOB GET {request.path} {up.status} range={request.headers.get('Range', '-')}", flush=True)
            resp = web.StreamResponse(status=up.status)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    resp.headers.add(k, v)
            if up.content_length is not None:
                resp.content_length = up.content_length
            if args.ratelimit_remaining and "/manifests/" in request.path:
                resp.headers["ratelimit-remaining"] = args.ratelimit_remaining
            await resp.prepare(request)
            is_blob = request.method == "GET" and "/blobs/" in request.path and up.status in (200, 206)
            middle = (up.content_length or 0) // 2
            flip = is_blob and (args.flip_byte or (args.flip_once and up.status == 206 and not flipped))
            flipped = flipped or flip
            sent = 0
            try:
                async for chunk in up.content.iter_chunked(64 * 1024):
                    if flip and sent <= middle < sent + len(chunk):
                        data = bytearray(chunk)
                        data[middle - sent] ^= 0xFF
                        chunk = bytes(data)
                    if is_blob and args.cut_after >= 0 and sent + len(chunk) > args.cut_after:
                        await resp.write(chunk[: args.cut_after - sent])
                        await asyncio.sleep(0.1)
                        assert request.transport is not None
                        request.transport.abort()
                        return resp
                    await resp.write(chunk)
                    sent += len(chunk)
                    if is_blob and args.rate:
                        await asyncio.sleep(len(chunk) / args.rate)
                await resp.write_eof()
                return resp
            finally:
                if is_blob:
                    print(f"BLOB SENT {request.path} {sent}", flush=True)

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
