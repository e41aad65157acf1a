#!/usr/bin/env python3
"""Modbus TCP devices whose holding registers are counters that change at known times.

    modbus_counter_sim.py PARAMS.json

PARAMS.json (written by bench/sensor_latency.sh): {"ports": [...], "points": K,
"rate": R, "t0": T0, "t_end": TE}. Device d listens on ports[d] (unit id ignored);
holding/input register a (0 <= a < K) of device d is point n = d*K + a with phase
n / (len(ports)*K), and holds

    v(t) = floor((min(t, t_end) - t0) * R - phase), at least 0, modulo 65536,

so value v >= 1 appears at exactly t0 + (v + phase) / R (wall clock, CLOCK_REALTIME).
The phases spread the changes evenly in time, so a poll finds them uniformly spread
over its interval. Only functions 3 and 4 are answered; others get exception 01.
Standard library only, so the benchmark needs nothing installed.
"""
import asyncio
import json
import math
import struct
import sys
import time


def main():
    p = json.load(open(sys.argv[1]))
    ports, k, rate, t0, t_end = p["ports"], p["points"], p["rate"], p["t0"], p["t_end"]
    total = len(ports) * k

    def value(n, now):
        x = (min(now, t_end) - t0) * rate - n / total
        return max(0, math.floor(x)) & 0xFFFF

    def handler(dev):
        async def serve(reader, writer):
            try:
                while True:
                    head = await reader.readexactly(7)
                    tid, proto, length, unit = struct.unpack(">HHHB", head)
                    if length < 2 or length > 260:
                        break
                    pdu = await reader.readexactly(length - 1)
                    fc = pdu[0]
                    now = time.time()
                    if fc in (3, 4) and len(pdu) == 5:
                        start, count = struct.unpack(">HH", pdu[1:5])
                        if count < 1 or count > 125 or start + count > k:
                            body = bytes([fc | 0x80, 2])
                        else:
                            regs = [value(dev * k + a, now) for a in range(start, start + count)]
                            body = bytes([fc, 2 * count]) + struct.pack(">%dH" % count, *regs)
                    else:
                        body = bytes([fc | 0x80, 1])
                    writer.write(struct.pack(">HHHB", tid, proto, len(body) + 1, unit) + body)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
        return serve

    async def run():
        servers = [await asyncio.start_server(handler(d), "127.0.0.1", port)
                   for d, port in enumerate(ports)]
        print("listening", flush=True)
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(run())


if __name__ == "__main__":
    main()
