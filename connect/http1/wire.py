"""HTTP/1.1 bytes the sidecar writes itself: status lines and the fields it adds."""

from __future__ import annotations

from http import HTTPStatus

_STATUS_LINES = {
    int(s): b"HTTP/1.1 " + str(int(s)).encode() + b" " + s.phrase.encode() + b"\r\n"
    for s in HTTPStatus
}
CRLF = b"\r\n"
COLON = b": "
SP = b" "
HTTP11 = b" HTTP/1.1\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CHUNKED_LINE = b"transfer-encoding: chunked\r\n"
CONNECTION_CLOSE = b"connection: close\r\n"
UPGRADE_LINE = b"connection: upgrade\r\nupgrade: "


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 " + str(status).encode() + b" Unknown\r\n"
