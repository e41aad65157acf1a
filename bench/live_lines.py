#!/usr/bin/env python3
"""Prints `L<seq> <unix time>` padded to 64 bytes, RATE lines/s, until killed (SIGTERM);
then writes the count to COUNT_FILE. Feed it to `mosquitto_pub -l`."""
import signal
import sys
import time

rate, count_file = float(sys.argv[1]), sys.argv[2]
sent = 0
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
start = time.time()
while not stop:
    line = "L%07d %.6f" % (sent, time.time())
    sys.stdout.write((line + " ").ljust(63, "x") + "\n")
    sys.stdout.flush()
    sent += 1
    delay = start + sent / rate - time.time()
    if delay > 0:
        time.sleep(delay)
open(count_file, "w").write("%d\n" % sent)
