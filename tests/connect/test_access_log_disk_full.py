"""Issue 14: the access log's disk fills up, and empties again. A real `AccessLog` writer task
writes to a file on a real small tmpfs (tests/connect/small_filesystem.py): while the disk is
full, every line is lost and counted (`write_failed`), the failure is logged once, and the
queue never backs up into the proxy; once there is space, logging resumes by itself (logged
once), and every line in the file parses."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from connect.access_log import AccessLog, AccessLogSettings
from connect.observe import Telemetry
from tests.connect.proxy_test_ca import spiffe
from tests.connect.small_filesystem import fill, free, small_filesystem


async def _until(what: str, done: object) -> None:
    for _ in range(1000):  # bounded: 10 s of 10 ms polls
        if callable(done) and done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_a_full_disk_loses_counted_lines_logs_once_and_logging_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshlet.access")
    with small_filesystem(tmp_path / "fs") as fs:
        path = fs / "access.log"
        log = AccessLog(AccessLogSettings(enabled=True, type="file", path=str(path)))
        log.batch_delay = 0.01
        side = Telemetry("web", spiffe("web")).upstream("api", "tcp")
        writer = asyncio.get_running_loop().create_task(log.run())
        sent = 0

        def line(n: int) -> None:
            log.tcp(side, None, received=n, sent=0, flags="-", start=0.0, upstream="h:1")

        try:
            for _ in range(20):
                line(sent)
                sent += 1
            await _until("the first lines written", lambda: log.drain_pending() == 0)
            await _until("in the file", lambda: path.read_bytes().count(b"\n") == 20)

            fill(fs)
            for _ in range(5):  # batches, each failing
                for _ in range(40):
                    line(sent)
                    sent += 1
                await _until("the batch tried", lambda: log.drain_pending() == 0)
            await _until("lines counted lost", lambda: log.write_failed >= 150)
            assert log.dropped == 0  # the queue did not back up

            free(fs)
            first_after = sent
            for _ in range(30):
                line(sent)
                sent += 1
            await _until(
                "logging resumed",
                lambda: b'"bytes_received":%d,' % (sent - 1) in path.read_bytes(),
            )
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

        raw = path.read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b""  # ends with a whole line
    records, cut = [], []
    for text in lines[:-1]:
        try:
            records.append(json.loads(text))
        except ValueError:
            cut.append(text)
    # At most one line was cut short by the full disk (and ended with a newline after).
    assert len(cut) <= 1, cut
    got = [r["bytes_received"] for r in records]
    assert len(got) == len(set(got))
    assert len(got) + log.write_failed == sent
    assert set(range(first_after, sent)) <= set(got)  # everything after the space came back

    errors = [r for r in caplog.records if "cannot write to" in r.getMessage()]
    resumed = [r for r in caplog.records if "writing to" in r.getMessage()]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()
    assert len(resumed) == 1 and f"{log.write_failed} lines were lost" in resumed[0].getMessage()
