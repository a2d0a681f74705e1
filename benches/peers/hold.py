#!/usr/bin/env python3
"""Holds idle keep-alive connections open to a proxy, for benches/compare.sh's memory cells.

Opens COUNT connections to 127.0.0.1:PORT, at most 200 at a time, and sends one GET on each
and reads its whole response, so that every connection has been through a request, as an idle
keep-alive connection has. Then prints "ready COUNT" and keeps them all open until SIGTERM.

Usage: hold.py PORT COUNT
"""
import asyncio
import signal
import sys

REQUEST = b"GET /api/members/me HTTP/1.1\r\nHost: bench\r\n\r\n"


async def one(port, held, slots):
    async with slots:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        held.append(writer)


async def main(port, count):
    held, slots = [], asyncio.Semaphore(200)
    await asyncio.gather(*(one(port, held, slots) for _ in range(count)))
    print(f"ready {len(held)}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for writer in held:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
