"""The bench's child processes: their output, a line at a time, and their stop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import trio

STOP_TIMEOUT = 20.0  # a broker drains and unmaps its region in this


async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    """The lines of a child's output stream, as they come."""
    pending = b""
    while True:
        data = await stream.receive_some(1 << 16)
        if not data:
            break
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


async def pump(stream: trio.abc.ReceiveStream | None, on_line: Callable[[str], None]) -> None:
    """Hand every line of ``stream`` to ``on_line`` until it ends."""
    if stream is None:
        return
    try:
        async for line in read_lines(stream):
            on_line(line)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def stop_process(process: trio.Process, sig: int) -> None:
    """Signal, wait (bounded), then kill; shielded so cleanup survives cancellation."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
