#!/usr/bin/env python3
"""Latency from a Modbus register change to its arrival at the cloud broker.

    sensor_latency_report.py PARAMS.json ARRIVALS.txt

ARRIVALS.txt is `mosquitto_sub -F '%U %t %p'` output at the cloud. The change time of
(point, value) follows from PARAMS.json (see modbus_counter_sim.py). Every value from 1
up to the last one the counters reached is expected exactly once; prints one JSON line.
"""
import json
import math
import re
import sys

p = json.load(open(sys.argv[1]))
ports, k, rate, t0, t_end = p["ports"], p["points"], p["rate"], p["t0"], p["t_end"]
total = len(ports) * k
topic_re = re.compile(r"/sensors/dev(\d+)/p(\d+)$")
value_re = re.compile(r'"value":\s*(-?\d+)')
ts_re = re.compile(r'"ts":\s*"([^"]+)"')

seen = {}
dups = 0
lat_change = []
lat_poll = []
from datetime import datetime
for line in open(sys.argv[2], errors="replace"):
    parts = line.rstrip("\n").split(" ", 2)
    if len(parts) < 3:
        continue
    m = topic_re.search(parts[1])
    if not m:
        continue
    v = value_re.search(parts[2])
    if not v:
        continue
    arrival = float(parts[0])
    n = int(m.group(1)) * k + int(m.group(2))
    val = int(v.group(1))
    if val == 0:
        continue  # the reading before the counters start
    key = (n, val)
    if key in seen:
        dups += 1
        continue
    seen[key] = arrival
    changed = t0 + (val + n / total) / rate
    lat_change.append(arrival - changed)
    ts = ts_re.search(parts[2])
    if ts:
        polled = datetime.fromisoformat(ts.group(1).replace("Z", "+00:00")).timestamp()
        lat_poll.append(arrival - polled)

expected = 0
missing = 0
for n in range(total):
    last = max(0, math.floor((t_end - t0) * rate - n / total))
    expected += last
    for val in range(1, last + 1):
        if (n, val) not in seen:
            missing += 1
unexpected = sum(1 for (n, val) in seen
                 if val > max(0, math.floor((t_end - t0) * rate - n / total)))


def pct(xs, q):
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None


out = {
    "devices": len(ports), "points": total, "changes_per_point_per_s": rate,
    "changes_per_s": rate * total, "poll_every_ms": p["every_ms"],
    "seconds": t_end - t0, "changes": expected, "arrived": expected - missing,
    "missing": missing, "duplicates": dups, "unexpected": unexpected,
    "change_to_cloud_ms": {"p50": pct(lat_change, 0.5), "p99": pct(lat_change, 0.99),
                           "max": pct(lat_change, 1.0), "min": pct(lat_change, 0.0)},
    "poll_to_cloud_ms": {"p50": pct(lat_poll, 0.5), "p99": pct(lat_poll, 0.99),
                         "max": pct(lat_poll, 1.0)},
}
print(json.dumps(out))
