#!/usr/bin/env python3
"""Drain rate, loss and live latency from the cloud collector's arrivals.

    bridge_tls_drain_report.py ARRIVALS.txt N LIVE_ACCEPTED CLOUD_UP_EPOCH

ARRIVALS.txt is `mosquitto_sub -F '%U %t %x'` at the cloud: backlog messages on up/bench/...
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
for line in open(path, errors="replace"):
    parts = line.split()
    if len(parts) < 3:
        continue
    t, topic, raw = float(parts[0]), parts[1], bytes.fromhex(parts[2])
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
