#!/usr/bin/env python3
"""Memory per idle MQTT connection, measured on a running gateway.

Provisions N devices through the REST API (bulk create), then logs each in over MQTT
3.1.1 (client id = username = device id, password = its token, keep-alive 300 s) on a
plain socket and leaves it idle. After each step of connections (default 1000, 5000,
10000 cumulative) it waits a moment and prints the gateway's RSS (from /proc) and the
RSS added per connection since the baseline (taken after one warm-up login).

Usage: scripts/mqtt-idle.py --mqtt HOST:PORT --http HOST:PORT --key ADMIN_KEY --pid PID
           [--steps 1000,5000,10000] [--prefix idle] [--cafile certs/ca.pem]
With --cafile the connections are mqtts (TLS, trusting only that CA; --mqtt is then the
mqtts listener), so the figure includes the gateway's TLS state per connection.
The process needs one file descriptor per connection (ulimit -n).
"""

import argparse
import json
import socket
import ssl
import struct
import time
import urllib.request


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")


def mqtt_str(b):
    return struct.pack("!H", len(b)) + b


def connect_packet(device, token):
    body = mqtt_str(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 300)
    body += mqtt_str(device.encode()) + mqtt_str(device.encode()) + mqtt_str(token.encode())
    out = bytearray([0x10])
    n = len(body)
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + body


def provision(http, key, ids):
    tokens = {}
    for i in range(0, len(ids), 10000):
        chunk = ids[i : i + 10000]
        req = urllib.request.Request(
            f"http://{http}/api/v1/devices:bulk",
            data=json.dumps({"devices": [{"id": d} for d in chunk]}).encode(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        for item in answer["results"]:
            if "token" in item:
                tokens[item["id"]] = item["token"]
    return tokens


def login(addr, device, token, tls=None):
    s = socket.create_connection(addr, timeout=30)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="localhost")
    s.sendall(connect_packet(device, token))
    ack = b""
    while len(ack) < 4:
        part = s.recv(4 - len(ack))
        if not part:
            raise SystemExit(f"{device}: closed before CONNACK")
        ack += part
    if ack[0] != 0x20 or ack[3] != 0:
        raise SystemExit(f"{device}: refused {ack!r}")
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mqtt", required=True)
    ap.add_argument("--http", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--pid", required=True, type=int)
    ap.add_argument("--steps", default="1000,5000,10000")
    ap.add_argument("--prefix", default="idle")
    ap.add_argument("--cafile", help="connect with TLS, trusting only this CA")
    a = ap.parse_args()
    tls = ssl.create_default_context(cafile=a.cafile) if a.cafile else None
    steps = [int(s) for s in a.steps.split(",")]
    host, port = a.mqtt.rsplit(":", 1)
    addr = (host, int(port))
    ids = [f"{a.prefix}-{i}" for i in range(steps[-1] + 1)]
    tokens = provision(a.http, a.key, ids)
    if len(tokens) != len(ids):
        raise SystemExit(f"provisioned {len(tokens)} of {len(ids)} devices")
    login(addr, ids[-1], tokens[ids[-1]], tls).close()
    time.sleep(2)
    base = rss(a.pid)
    print(f"baseline RSS {base / 1e6:.1f} MB")
    conns = []
    for step in steps:
        while len(conns) < step:
            d = ids[len(conns)]
            conns.append(login(addr, d, tokens[d], tls))
        time.sleep(3)
        now = rss(a.pid)
        print(
            f"{step} idle connections: RSS {now / 1e6:.1f} MB, "
            f"+{(now - base) / 1e6:.1f} MB, {(now - base) / step:.0f} bytes per connection"
        )
    for s in conns:
        s.close()


if __name__ == "__main__":
    main()
