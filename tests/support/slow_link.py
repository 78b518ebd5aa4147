"""A TCP relay that throttles uploads and downloads, standing in for a slow link to object storage.

Throttled uploads widen the window in which a checkpoint is half uploaded, so a test can kill a rank
exactly then instead of hoping a random moment lands there; throttled downloads make a model or
dataset fetch outlast a short collective timeout, as a 70B download does on a real link.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CHUNK = 16 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await reader.read(CHUNK):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@contextmanager
def slow_link(
    upstream_host: str, upstream_port: int, *, upload_delay: float, download_delay: float = 0.0
) -> Iterator[str]:
    """Yields `http://127.0.0.1:<port>`, relaying to upstream with `upload_delay` per 16 KiB sent
    and `download_delay` per 16 KiB received."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    address: list[str] = []

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pump(client_reader, up_writer, upload_delay), _pump(up_reader, client_writer, download_delay)
        )

    async def serve() -> asyncio.Server:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        address.append(f"http://127.0.0.1:{port}")
        ready.set()
        return server

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve())
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())

    thread = threading.Thread(target=run, name="slow-link", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the slow link did not start")
    try:
        yield address[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


if __name__ == "__main__":
    # `python -m tests.support.slow_link HOST PORT DELAY`: serve in a process of its own (benchmarks
    # keep the relay from competing with the code they measure); prints the url, runs until killed.
    import sys

    with slow_link(sys.argv[1], int(sys.argv[2]), upload_delay=float(sys.argv[3])) as relay_url:
        print(relay_url, flush=True)
        threading.Event().wait()
