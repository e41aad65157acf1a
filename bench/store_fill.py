#!/usr/bin/env python3
"""Fills a broker's store over plain MQTT 3.1.1 (standard library only), for
bench/store_restart.sh: retained messages on distinct topics, persistent sessions that
subscribe and leave, and QoS 1 messages they are then owed.

    store_fill.py PORT retained N SIZE            N retained messages of SIZE bytes
    store_fill.py PORT sessions N FILTER          N persistent sessions subscribed to FILTER
    store_fill.py PORT publish N SIZE TOPIC       N QoS 1 messages to TOPIC

Every QoS 1 publish is acknowledged before the script returns (a window of 200 in
flight), so what it reports is what the broker has promised to keep.
"""

import socket
import struct
import sys
import time


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def packet(kind, body):
    return bytes([kind]) + varint(len(body)) + body


def connect(port, client_id, clean=True):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    flags = 0x02 if clean else 0x00
    body = string("MQTT") + bytes([4, flags]) + struct.pack(">H", 600) + string(client_id)
    s.sendall(packet(0x10, body))
    ack = read_packet(s)
    if ack[0] != 0x20 or ack[1][1] != 0:
        raise SystemExit(f"CONNACK refused: {ack}")
    return s


def read_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise SystemExit("connection closed")
        buf += chunk
    return bytes(buf)


def read_packet(s):
    head = read_exact(s, 1)[0]
    mult, length = 1, 0
    while True:
        b = read_exact(s, 1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return head, read_exact(s, length)


def publish_many(s, messages, window=200):
    """messages: iterable of (topic, payload, retain); QoS 1, waits for every PUBACK."""
    in_flight, pid, sent, acked = 0, 0, 0, 0
    it = iter(messages)
    done = False
    while not done or in_flight:
        while not done and in_flight < window:
            try:
                topic, payload, retain = next(it)
            except StopIteration:
                done = True
                break
            pid = pid % 65535 + 1
            flags = 0x32 | (0x01 if retain else 0)
            s.sendall(packet(flags, string(topic) + struct.pack(">H", pid) + payload))
            in_flight += 1
            sent += 1
        if in_flight:
            head, _ = read_packet(s)
            if head >> 4 == 4:
                in_flight -= 1
                acked += 1
    return acked


def main():
    port, mode, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    start = time.monotonic()
    if mode == "retained":
        size = int(sys.argv[4])
        s = connect(port, "fill-retained")
        body = b"r" * size
        acked = publish_many(s, ((f"ret/{i}", body, True) for i in range(n)))
        print(f"{acked} retained messages of {size} B acknowledged")
    elif mode == "sessions":
        filt = sys.argv[4]
        for i in range(n):
            s = connect(port, f"fill-session-{i}", clean=False)
            s.sendall(packet(0x82, struct.pack(">H", 1) + string(filt) + bytes([1])))
            head, _ = read_packet(s)
            assert head == 0x90, head
            s.sendall(packet(0xE0, b""))
            s.close()
        print(f"{n} persistent sessions subscribed to {filt}")
    elif mode == "publish":
        size, topic = int(sys.argv[4]), sys.argv[5]
        s = connect(port, "fill-publisher")
        body = b"q" * size
        acked = publish_many(s, ((topic, body, False) for _ in range(n)))
        print(f"{acked} messages of {size} B to {topic} acknowledged")
    else:
        raise SystemExit(__doc__)
    print(f"  in {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
