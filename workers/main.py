"""`python -m workers.main FD PARENT FDS`: an engine worker process, started by the server (workers.client).

FD is this process's end of the server's socket pair, PARENT the server's pid, FDS its end of the descriptor
channel that images' memfds come on (`-`: none, the pixels come on FD). The worker dies with the server:
PR_SET_PDEATHSIG on Linux, and the socket's end of stream everywhere (the engine is closed and the process exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys

_PR_SET_PDEATHSIG = 1


async def _main(fd: int, fds: int | None) -> None:
    from workers.host import EngineHost

    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
    channel = None
    if fds is not None:
        channel = socket.socket(fileno=fds)
        channel.setblocking(False)  # a descriptor is read only once its "run" frame says it has come
    await EngineHost(reader, writer, channel).serve()


def main() -> None:
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    fds = None if len(sys.argv) < 4 or sys.argv[3] == "-" else int(sys.argv[3])
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return  # the server died before prctl took effect
    # The server died (PR_SET_PDEATHSIG) or someone stops us: take the engine's own processes (vLLM's engine
    # core) along at once; the worker leads its own process group (workers.client starts it so).
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    asyncio.run(_main(fd, fds))


if __name__ == "__main__":
    main()
