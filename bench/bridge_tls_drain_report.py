#!/usr/bin/env python3
"""Drain rate, loss and live latency from the cloud collector's arrivals.

    bridge_tls_drain_report.py ARRIVALS.txt N LIVE_ACCEPTED CLOUD_UP_EPOCH

ARRIVALS.txt is `mosquitto_sub -F '%U %t %p'` at the cloud (or '%U %t %x' with FORMAT=x in
the environment; hex costs the collector far more CPU): backlog messages on up/bench/...
carry outpost-bench's header (8 bytes: publisher << 48 | seq), live ones on up/live/...
`L<seq> <send time>`. LIVE_ACCEPTED is how many live messages the gateway's own broker
delivered to a local subscriber. Prints one JSON line.
"""
import json
import sys

path, n, live_sent, cloud_up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fill_seen, live_seen = set(), {}
fill_first = fill_last = None
fill_dups = live_dups = 0


def records_hex():
    for line in open(path, errors="replace"):
        parts = line.split()
        if len(parts) >= 3:
            yield float(parts[0]), parts[1], bytes.fromhex(parts[2])


def records_raw():
    # Binary payloads may hold spaces and newlines, so records are cut by the payloads'
    # fixed sizes: 64 bytes from outpost-bench, 63 for a live line.
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
        sp1 = data.index(b" ", i)
        sp2 = data.index(b" ", sp1 + 1)
        t, topic = float(data[i:sp1]), data[sp1 + 1:sp2].decode()
        size = 64 if topic.startswith("up/bench/") else 63
        raw = data[sp2 + 1:sp2 + 1 + size]
        if data[sp2 + 1 + size:sp2 + 2 + size] != b"\n":
            raise SystemExit("unexpected record at byte %d" % i)
        i = sp2 + 2 + size
        yield t, topic, raw


import os
for t, topic, raw in (records_hex() if os.environ.get("FORMAT") == "x" else records_raw()):
    if topic.startswith("up/bench/"):
        s = int.from_bytes(raw[:8], "big")
        if s in fill_seen:
            fill_dups += 1
            continue
        fill_seen.add(s)
        fill_first = t if fill_first is None else min(fill_first, t)
        fill_last = t if fill_last is None else max(fill_last, t)
    elif topic.startswith("up/live/"):
        f = raw.decode().split()
        s = int(f[0][1:])
        if s in live_seen:
            live_dups += 1
            continue
        live_seen[s] = (float(f[1]), t)


def pct(xs, q):
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None


def stats(xs):
    return {"n": len(xs), "p50_ms": pct(xs, 0.5), "p99_ms": pct(xs, 0.99), "max_ms": pct(xs, 1.0)}


queued = [a - s for s, a in live_seen.values() if s < cloud_up]
during = [a - s for s, a in live_seen.values() if cloud_up <= s <= (fill_last or 0)]
after = [a - s for s, a in live_seen.values() if s > (fill_last or 0)]
span = (fill_last - fill_first) if fill_seen else 0
print(json.dumps({
    "backlog": n, "backlog_arrived": len(fill_seen), "backlog_missing": n - len(fill_seen),
    "backlog_duplicates": fill_dups,
    "drain_seconds_first_to_last": round(span, 3),
    "drain_rate_msgs_per_s": round(len(fill_seen) / span) if span > 0 else None,
    "seconds_cloud_up_to_last": round((fill_last or cloud_up) - cloud_up, 3),
    "rate_incl_connect": round(len(fill_seen) / ((fill_last or cloud_up) - cloud_up)) if fill_seen else None,
    "live_sent": live_sent, "live_arrived": len(live_seen), "live_missing": live_sent - len(live_seen),
    "live_duplicates": live_dups,
    "live_latency_sent_while_cloud_down": stats(queued),
    "live_latency_sent_during_drain": stats(during),
    "live_latency_sent_after_drain": stats(after),
}))
