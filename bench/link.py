"""An emulated long-haul link as a TCP relay: one-way delay both ways, a shared bottleneck rate, and the
throughput ceiling that packet loss puts on each TCP connection.

This kernel has no ``sch_netem``, so delay and loss cannot come from ``tc``. A relay reproduces what a
pull over such a path feels like at the level that decides a pull's time:

- **Delay**: every chunk is held ``delay`` seconds in each direction; a new connection costs one round trip
  before its first request byte moves (the TCP handshake), so a request/response costs two round trips on a
  fresh connection and one on a kept-alive one, as on the real path (no TLS here).
- **Bottleneck**: the server-to-client bytes of all connections share one token bucket of ``link_bps``.
- **Loss**: a loss-based TCP (reno, cubic) on a path with loss rate p reaches about
  ``MSS / RTT * 1.22 / sqrt(p)`` (Mathis et al., 1997): ~2.4 mbit at 160 ms and 0.2 % loss, whatever the link
  rate. Each connection gets that as its own ceiling (``conn_bps``), reached after a slow start that doubles a
  10-segment window every round trip. ``conn_bps = 0`` models a loss-insensitive TCP (BBR): no ceiling.

It does not drop packets, so it does not model retransmission stalls (timeouts) -- those would hurt a single
stream more than parallel ones, so the emulation is, if anything, kind to single-stream clients.
Bytes are counted as the relay reads them from the server: what left the upstream, delivered or not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

CHUNK = 16 * 1024
QUEUE_CHUNKS = 16  # per direction: what the path holds in flight beyond the socket buffers
MSS = 1460
INITIAL_WINDOW = 10 * MSS


class Bucket:
    """Token bucket; ``rate`` bytes/s, or unlimited when 0."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = float(CHUNK)
        self.last = time.monotonic()

    def current_rate(self) -> float:
        return self.rate

    async def take(self, n: int) -> None:
        while True:
            rate = self.current_rate()
            if rate <= 0:
                return
            now = time.monotonic()
            self.tokens = min(float(max(CHUNK, n)), self.tokens + (now - self.last) * rate)
            self.last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / rate)


class SlowStartBucket(Bucket):
    """A connection's ceiling, reached by doubling from the initial window each round trip."""

    def __init__(self, rate: float, rtt: float) -> None:
        super().__init__(rate)
        self.rtt = rtt
        self.born = time.monotonic()

    def current_rate(self) -> float:
        if self.rate <= 0:
            return 0
        if self.rtt <= 0:
            return self.rate
        rounds = (time.monotonic() - self.born) / self.rtt
        return min(self.rate, INITIAL_WINDOW / self.rtt * 2 ** min(rounds, 40))


class Link:
    def __init__(self, target: tuple[str, int], *, delay: float, link_bps: float, conn_bps: float) -> None:
        self.target = target
        self.delay = delay
        self.link = Bucket(link_bps / 8)
        self.conn_bps = conn_bps
        self.down_bytes = 0  # server -> client, as read from the server
        self.connections = 0
        self.up = True
        self.blackhole = False  # when cut: hold new connections silently instead of closing them
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_w = None
        try:
            await asyncio.sleep(2 * self.delay)  # the handshake's round trip
            if not self.up:
                if self.blackhole:
                    await asyncio.Event().wait()  # nothing ever answers; the client's timeout decides
                return
            server_r, server_w = await asyncio.open_connection(*self.target)
            conn = SlowStartBucket(self.conn_bps / 8, 2 * self.delay)
            await asyncio.gather(
                self._pipe(client_r, server_w, [], count=False),
                self._pipe(server_r, client_w, [conn, self.link], count=True),
            )
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # a reset, or the link was cut: the client sees its connection close
        finally:
            self._tasks.discard(task)
            for w in (client_w, server_w):
                if w is not None:
                    w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buckets: list[Bucket], *, count: bool
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)

        async def pump() -> None:
            try:
                while data := await reader.read(CHUNK):
                    if count:
                        self.down_bytes += len(data)
                    await queue.put((time.monotonic() + self.delay, data))
            finally:
                await queue.put(None)

        pumping = asyncio.create_task(pump())
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                for bucket in buckets:
                    await bucket.take(len(data))
                writer.write(data)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.write_eof()
        finally:
            pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await pumping

    def cut(self, blackhole: bool = False) -> None:
        """The upstream becomes unreachable: open connections die; new ones are closed at once (a reset) or,
        with ``blackhole``, never answered (a firewall dropping packets)."""
        self.up = False
        self.blackhole = blackhole
        for task in list(self._tasks):
            task.cancel()


async def serve(link: Link, port: int) -> asyncio.Server:
    return await asyncio.start_server(link.handle, "127.0.0.1", port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--rtt-ms", type=float, default=160)
    parser.add_argument("--link-mbit", type=float, default=40)
    parser.add_argument("--conn-mbit", type=float, default=3)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    link = Link(
        (host, int(port)), delay=args.rtt_ms / 2000, link_bps=args.link_mbit * 1e6, conn_bps=args.conn_mbit * 1e6
    )

    async def run() -> None:
        server = await serve(link, args.listen)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
