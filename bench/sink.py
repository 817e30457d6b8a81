#!/usr/bin/env python3
"""A fast SMTP sink for the benchmark: accepts everything, records when it said 250.

    python3 bench/sink.py PORT RECORD_FILE

Speaks just enough ESMTP for smtplib (EHLO with PIPELINING, MAIL, RCPT, DATA, RSET, NOOP,
QUIT). For every message it appends "MESSAGE-ID TIME\\n" to RECORD_FILE, TIME being the
moment its 250 was written (time.time()), so the benchmark can compute enqueue-to-250
latency and count deliveries. Prints "ready" on stdout once listening.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time

MESSAGE_ID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


class Sink:
    """Counts messages and keeps their Message-ID and 250 time, flushed every 50 ms."""

    def __init__(self, record: str):
        self.record = open(record, "a", buffering=1 << 16)  # noqa: SIM115 - lives as long as the sink
        self.queued = 0

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self.record.flush()

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    data = await reader.readuntil(b"\r\n.\r\n")
                    found = MESSAGE_ID.search(data, 0, data.find(b"\r\n\r\n"))
                    self.queued += 1
                    writer.write(b"250 2.0.0 Ok: queued as S%d\r\n" % self.queued)
                    message_id = found.group(1).decode() if found else "-"
                    self.record.write(f"{message_id} {time.time():.6f}\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:  # MAIL, RCPT, RSET, NOOP
                    writer.write(b"250 2.0.0 Ok\r\n")
                if writer.transport.get_write_buffer_size() > 65536:
                    await writer.drain()  # flow control only when the client stops reading
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def serve(port: int, record: str) -> None:
    sink = Sink(record)
    server = await asyncio.start_server(sink.session, "127.0.0.1", port, backlog=256)
    asyncio.get_running_loop().create_task(sink.flusher())
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
