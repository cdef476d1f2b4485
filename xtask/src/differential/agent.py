#!/usr/bin/python3
"""The differential run's agent on one side (the guest's kernel, or the
gateway's namespace): no scapy, so it starts fast under TCG.

  agent.py LOG REQDIR SKIP
- records every frame received on an interface not in SKIP (comma list) as
  a JSON line in LOG: {"if": NAME, "ht": ARPHRD, "proto": ETHERTYPE,
  "hex": BYTES, "gso": [TYPE, SIZE] for a GSO packet}; frames the
  host itself sends (PACKET_OUTGOING) are not recorded;
- a UDP socket on port 9 (IPv4 and IPv6) takes what the cases deliver, so
  that no port-unreachable answers them;
- answers requests REQDIR/N.req (JSON) in REQDIR/N.resp:
  {"op": "counters"}: every device's statistics, /proc/net/snmp,
  /proc/net/snmp6 and /proc/net/netstat, as one flat object;
  {"op": "sh", "cmd": SCRIPT}: its exit status and output.
"""
import json
import os
import select
import socket
import subprocess
import sys

log_path, req_dir, skip = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
os.makedirs(req_dir, exist_ok=True)
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sniff.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
# Each frame comes with its virtio-net header: a GSO packet (the gateway
# coalesces as GRO would) is recorded with its segment size, to be cut back.
sniff.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
sniff.setblocking(False)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", 9))
udp.setblocking(False)
log = open(log_path, "a")


def counters():
    out = {}
    for dev in os.listdir("/sys/class/net"):
        d = "/sys/class/net/%s/statistics" % dev
        try:
            for f in os.listdir(d):
                with open(os.path.join(d, f)) as fh:
                    out["%s.%s" % (dev, f)] = int(fh.read())
        except OSError:
            pass
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = open(path).read().splitlines()
        for h, v in zip(lines[0::2], lines[1::2]):
            hk, vk = h.split(), v.split()
            pre = hk[0].rstrip(":")
            for k, val in zip(hk[1:], vk[1:]):
                out["%s.%s" % (pre, k)] = int(val)
    for line in open("/proc/net/snmp6"):
        p = line.split()
        if len(p) == 2:
            out["snmp6." + p[0]] = int(p[1])
    return out


def answer(name):
    path = os.path.join(req_dir, name)
    try:
        req = json.load(open(path))
    except (OSError, ValueError):
        return
    if req["op"] == "counters":
        resp = counters()
    elif req["op"] == "sh":
        p = subprocess.run(req["cmd"], shell=True, capture_output=True, text=True, timeout=300)
        resp = {"rc": p.returncode, "out": p.stdout + p.stderr}
    else:
        resp = {"error": "unknown op"}
    base = path[: -len(".req")]
    with open(base + ".tmp", "w") as f:
        json.dump(resp, f)
    os.rename(base + ".tmp", base + ".resp")
    os.unlink(path)


open(log_path + ".ready", "w").close()
while True:
    r, _, _ = select.select([sniff, udp], [], [], 0.05)
    wrote = False
    while True:
        try:
            data, addr = sniff.recvfrom(65535)
        except BlockingIOError:
            break
        if addr[2] == socket.PACKET_OUTGOING or addr[0] in skip:
            continue
        gso_type, gso_size = data[1], int.from_bytes(data[4:6], "little")
        rec = {"if": addr[0], "ht": addr[3], "proto": addr[1], "hex": data[10:].hex()}
        if gso_type:
            rec["gso"] = [gso_type & 0x7F, gso_size]
        log.write(json.dumps(rec) + "\n")
        wrote = True
    if wrote:
        log.flush()
    while True:
        try:
            udp.recv(65535)
        except BlockingIOError:
            break
    for name in sorted(os.listdir(req_dir)):
        if name.endswith(".req"):
            answer(name)
