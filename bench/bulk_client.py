"""Bulk transfer client for `make bench`: one large download or upload over HTTP/1.1.

    bulk_client.py download --port P --path /bulk     (reads the whole Content-Length body)
    bulk_client.py upload --port P --path /upload --bytes 104857600

Plain blocking sockets with a 1 MiB buffer, so the client costs little next to the proxies
it measures. The clock runs from the first byte written to the last byte read (download) or
to the response's head (upload, sent after the whole body). Prints one JSON object: bytes,
seconds, gbit_s, status. A socket timeout bounds every run.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

CHUNK = 1 << 20


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_head(sock: socket.socket, buf: bytearray) -> tuple[int, int, bytes]:
    """Status, Content-Length (-1 if absent) and the body bytes read past the head."""
    data = b""
    while b"\r\n\r\n" not in data:
        n = sock.recv_into(buf)
        if n == 0:
            raise ConnectionError(f"closed before the response head: {data[:200]!r}")
        data += bytes(buf[:n])
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, length, rest


def download(port: int, path: str, timeout: float) -> dict[str, float]:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with _connect(port, timeout) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
        status, length, rest = _read_head(sock, buf)
        if length < 0:
            raise ConnectionError("the download answer has no Content-Length")
        got = len(rest)
        while got < length:
            n = sock.recv_into(view)
            if n == 0:
                raise ConnectionError(f"closed after {got} of {length} body bytes")
            got += n
        seconds = time.perf_counter() - started
    return {"bytes": got, "seconds": seconds, "gbit_s": got * 8 / seconds / 1e9, "status": status}


def upload(port: int, path: str, size: int, timeout: float) -> dict[str, float]:
    block = b"x" * CHUNK
    buf = bytearray(CHUNK)
    with _connect(port, timeout) as sock:
        started = time.perf_counter()
        head = f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Length: {size}\r\n"
        sock.sendall(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n")
        left = size
        while left > 0:
            n = min(left, CHUNK)
            sock.sendall(block[:n] if n < CHUNK else block)
            left -= n
        status, _, _ = _read_head(sock, buf)
        seconds = time.perf_counter() - started
    return {"bytes": size, "seconds": seconds, "gbit_s": size * 8 / seconds / 1e9, "status": status}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["download", "upload"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/bulk")
    p.add_argument("--bytes", type=int, default=100 << 20)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()
    if a.mode == "download":
        out = download(a.port, a.path, a.timeout)
    else:
        out = upload(a.port, a.path, a.bytes, a.timeout)
    print(json.dumps(out))
