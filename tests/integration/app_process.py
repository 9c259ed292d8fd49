"""An aiohttp app in a process of its own, so that SIGKILL really drops its sockets, as a mesh's
app (it quacks like tests/integration/mesh.py's in-process apps: server_address, shutdown,
server_close)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]


def serve_web_app(app: web.Application, name: str) -> None:
    """An app process's main: serve `app` on a free 127.0.0.1 port, say which, run forever."""

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        print(f"app {name} listening on 127.0.0.1:{sock.getsockname()[1]}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


class AppProcess:
    """`main(name)` run in a new Python process, `main` named "package.module:function" (a
    function that ends in `serve_web_app`); its output is kept in `lines`."""

    def __init__(self, name: str, main: str) -> None:
        self.name = name
        module, function = main.split(":")
        code = f"from {module} import {function}; {function}({name!r})"
        self.p = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.p.stdout is not None
        self.lines: list[str] = []
        while "listening on" not in (line := self.p.stdout.readline()):
            if not line:
                self.p.wait(30)
                raise AssertionError(f"app {name} exited:\n{''.join(self.lines)}")
            self.lines.append(line)
        self.server_address = ("127.0.0.1", int(line.rsplit(":", 1)[1]))
        out = self.p.stdout
        self.drain = threading.Thread(target=lambda: self.lines.extend(out), daemon=True)
        self.drain.start()

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(30)

    def shutdown(self) -> None:
        if self.p.poll() is None:
            self.p.kill()

    def server_close(self) -> None:
        self.p.wait(30)
        self.drain.join(30)  # up to the output's EOF
        assert self.p.stdout is not None
        self.p.stdout.close()
