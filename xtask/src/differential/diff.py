#!/usr/bin/python3
"""The differential run's driver, on the host in the wire namespace: every
case is a scapy template filled in for each side (its LOCAL/REMOTE, MACs and
inner addresses), so the same bytes, addresses swapped and checksums
recomputed, go to the kernel (on QEMU's tap: the guest) and to the gateway
(on the veth whose other end is ens0). After each case a fence (an echo
request through the plain GRE tunnel) is sent to both: once its reply is back
on the wire and the side's agent has logged it, everything before it has been
processed. Then each side's outcome is read: what its devices received
(the agent's log), what it sent back on the wire (captured here), and which
counters moved. Scapy dissects everything; the gateway's code is not used.

  diff.py CONFIG.json   (written by xtask/src/differential/mod.rs)

Writes the results as JSON to config["out"].
"""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

from scapy.all import (  # noqa: F401
    GRE,
    ICMP,
    IP,
    TCP,
    UDP,
    Ether,
    HBHOptUnknown,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    Raw,
    conf,
    fragment,
    fragment6,
)
from scapy.layers.inet6 import _ICMPv6
from scapy.utils import checksum

conf.verb = 0
logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
cfg = json.load(open(sys.argv[1]))

FENCE_ID = 0xF3CE
# Inner addresses per tunnel label: (the gateway's, the kernel's).
INNER = {
    "plain": ("10.1.1.1", "10.1.1.2"),
    "keyed": ("30.1.1.1", "30.1.1.2"),
    "ipip": ("20.1.1.1", "20.1.1.2"),
    "sit": ("fd00:5::1", "fd00:5::2"),
    "ip6gre": ("40.1.1.1", "40.1.1.2"),
    "ip6ip6": ("fd00:66::1", "fd00:66::2"),
}
DEVICES = {
    "kernel": {"plain": "plain", "keyed": "keyed", "ipip": "ipip", "sit1": "sit",
               "g6": "ip6gre", "t66": "ip6ip6"},
    "gateway": {"tap1": "plain", "tun3": "keyed", "tun2": "ipip", "tun5": "sit",
                "tun6": "ip6gre", "tun7": "ip6ip6"},
}
ROUTER, ROUTER6 = "192.168.0.1", "2001:db8::1"
ECN = ["not-ECT", "ECT(1)", "ECT(0)", "CE"]


# ---------------------------------------------------------------- the sides

class Side:
    def __init__(self, name, c, iface):
        self.name = name
        self.c = c
        k = name == "kernel"
        self.local, self.remote = ("192.168.0.58", "192.168.0.8") if k else ("192.168.0.8", "192.168.0.58")
        self.local6, self.remote6 = ("2001:db8::58", "2001:db8::8") if k else ("2001:db8::8", "2001:db8::58")
        self.rmac, self.smac = c["mac"], c["peer_mac"]
        self.me = {l: a[1] if k else a[0] for l, a in INNER.items()}
        self.peer = {l: a[0] if k else a[1] for l, a in INNER.items()}
        self.roles = {self.local: "LOCAL", self.remote: "REMOTE", self.local6: "LOCAL6",
                      self.remote6: "REMOTE6", ROUTER: "ROUTER", ROUTER6: "ROUTER6"}
        for l in INNER:
            self.roles[self.me[l]] = "ME(%s)" % l
            self.roles[self.peer[l]] = "PEER(%s)" % l
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((iface, 3))
        self.wire = []  # frames the side sent, as captured here
        self.lock = threading.Lock()
        self.log = []  # the agent's records
        self.log_off = 0
        self.req_n = 0
        self.sent_frames = 0
        threading.Thread(target=self.sniff, daemon=True).start()

    def sniff(self):
        while True:
            data, addr = self.sock.recvfrom(65535)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            with self.lock:
                self.wire.append(data)

    def send(self, frames):
        for f in frames:
            self.sock.send(bytes(f))
            self.sent_frames += 1

    def read_log(self):
        with open(self.c["log"]) as f:
            f.seek(self.log_off)
            text = f.read()
        end = text.rfind("\n") + 1
        self.log_off += len(text[:end].encode())
        for line in text[:end].splitlines():
            self.log.append(json.loads(line))

    def request(self, req, limit=300):
        self.req_n += 1
        base = os.path.join(self.c["req"], "%d" % self.req_n)
        with open(base + ".tmp", "w") as f:
            json.dump(req, f)
        os.rename(base + ".tmp", base + ".req")
        start = time.time()
        while not os.path.exists(base + ".resp"):
            if time.time() - start > limit:
                raise RuntimeError("%s's agent did not answer %s within %d s" % (self.name, req, limit))
            time.sleep(0.02)
        r = json.load(open(base + ".resp"))
        os.unlink(base + ".resp")
        return r

    def sh(self, cmd):
        if self.name == "kernel":
            return self.request({"op": "sh", "cmd": cmd})
        p = subprocess.run(["ip", "netns", "exec", self.c["ns"], "sh", "-c", cmd],
                           capture_output=True, text=True, timeout=300)
        return {"rc": p.returncode, "out": p.stdout + p.stderr}

    def counters(self):
        if self.name == "kernel":
            return self.request({"op": "counters"})
        s = self.settled_stats()
        flat = {}
        for k, v in s.get("drops", {}).items():
            flat["drops." + k] = v
        for k, v in s.get("xdp", {}).items():
            if k.startswith("pass_"):
                flat["xdp." + k] = v
        for t in s.get("tunnels", []):
            flat["%s.rx_packets" % t["name"]] = t.get("rx_packets", 0)
        for w in s.get("workers", []):
            for k in ("keepalives", "path_mtu_updates", "fragments_merged", "fragments_pending"):
                flat[k] = flat.get(k, 0) + w.get(k, 0)
        return flat

    def stats(self):
        out = subprocess.run(["ip", "netns", "exec", self.c["ns"], self.c["bin"], "stats",
                              "--iface", "ens0", "--format", "json"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return json.loads(out)

    def settled_stats(self, limit=120):
        """The gateway's counters once they account for every frame sent to
        it: the workers publish theirs from time to time, so a read right
        after the fence may not show the last packets yet. Every frame on
        ens0 is one sent from here (the wire's ends have no IPv6 of their
        own), so: the XDP program saw them all, the workers took every frame
        it redirected, each worker's frames add up (docs/rules.md, What adds
        up), and the tunnel packets the gateway sent (seen here) are
        counted."""
        start = time.time()
        while True:
            s = self.stats()
            ws = s.get("workers", [])
            sm = lambda k: sum(w.get(k, 0) for w in ws)  # noqa: E731
            drops = s.get("drops", {})
            rx_drops = sum(v for k, v in drops.items() if not k.startswith("tx_"))
            tx_drops = sum(v for k, v in drops.items() if k.startswith("tx_"))
            xsk = sum(w.get("xsk", {}).get("rx_dropped", 0) + w.get("xsk", {}).get("rx_ring_full", 0)
                      for w in ws)
            xdp = s.get("xdp", {})
            with self.lock:
                tunnel_out = sum(1 for f in self.wire if tunnel_frame(f))
            ok = (xdp.get("seen", 0) == self.sent_frames
                  and sm("rx_frames") + xsk == xdp.get("redirected", 0)
                  and sm("rx_frames") == sm("delivered") + sm("keepalives") + sm("path_mtu_updates")
                  + sm("fragments_merged") + sm("fragments_pending") + rx_drops
                  and sm("tx_read") == sm("tx_sent") + sm("tx_replies") + tx_drops
                  and sm("tx_sent") + sm("keepalives") >= tunnel_out)
            if ok:
                if os.environ.get("DIFF_DEBUG"):
                    print("[stats] " + json.dumps(ws), file=sys.stderr)
                return s
            if time.time() - start > limit:
                raise RuntimeError("the gateway's counters did not settle within %d s (sent %d frames): %s"
                                   % (limit, self.sent_frames, json.dumps(s)))
            time.sleep(0.05)

    def frame(self, pkt):
        if isinstance(pkt, Ether):
            return pkt
        return Ether(src=self.smac, dst=self.rmac) / pkt

    def fence_frame(self, n):
        return self.frame(IP(src=self.remote, dst=self.local) / GRE() /
                          IP(src=self.peer["plain"], dst=self.me["plain"]) /
                          ICMP(type=8, id=FENCE_ID, seq=n) / Raw(b"fence"))


def tunnel_frame(f):
    """A tunnel packet (GRE, IPIP, IPv6 in IP; over IPv4 or IPv6, with an
    encapsulation-limit option or not) in an Ethernet frame."""
    if len(f) < 34:
        return False
    if f[12:14] == b"\x08\x00":
        return f[23] in (4, 41, 47)
    if f[12:14] == b"\x86\xdd" and len(f) >= 62:
        return f[20] in (4, 41, 47) or (f[20] == 60 and f[54] in (4, 41, 47))
    return False


def is_fence(p, typ):
    return ICMP in p and p[ICMP].type == typ and p[ICMP].id == FENCE_ID


def fenced(side, n, wire_from, log_from):
    with side.lock:
        frames = side.wire[wire_from:]
    replied = any(is_fence(Ether(f), 0) and Ether(f)[ICMP].seq == n for f in frames)
    side.read_log()
    logged = any(
        r["hex"].find("%04x%04x" % (FENCE_ID, n)) >= 0 and is_fence(parse_dev(r)[0], 8)
        for r in side.log[log_from:]
    )
    return replied and logged


# ---------------------------------------------------------------- dissection

def parse_dev(rec):
    """The packets a device received: an IP packet (the Ethernet header of a
    tap frame taken off), or, for a GSO packet, its segments cut back as
    the receiving stack would (the gateway coalesces as a NIC's GRO does)."""
    data = bytes.fromhex(rec["hex"])
    if rec["ht"] == 1:
        e = Ether(data)
        if e.type not in (0x0800, 0x86DD):
            return [None]
        data = bytes(e.payload)
    if not data:
        return [None]
    v = data[0] >> 4
    p = IP(data) if v == 4 else IPv6(data) if v == 6 else Raw(data)
    gso = rec.get("gso")
    if not gso or not (UDP in p or TCP in p):
        return [p]
    size = gso[1]
    l4 = p[UDP] if UDP in p else p[TCP]
    payload = bytes(l4.payload)
    out = []
    for i in range(0, len(payload), size):
        q = p.copy()
        seg = q[UDP] if UDP in q else q[TCP]
        seg.remove_payload()
        if isinstance(seg, TCP):
            seg.seq = (l4.seq + i) % (1 << 32)
        seg.chksum = None
        if isinstance(seg, UDP):
            seg.len = None
        seg.add_payload(Raw(payload[i:i + size]))
        if IP in q:
            q[IP].len = None
            q[IP].chksum = None
        else:
            q[IPv6].plen = None
        out.append(q.__class__(bytes(q)))
    return out


def layers(p):
    while p is not None and not isinstance(p, type(None)) and p.__class__.__name__ != "NoPayload":
        yield p
        p = p.payload


def chatter(p):
    """Neighbour discovery, router solicitations, MLD, IGMP: the hosts'
    own housekeeping, not an outcome."""
    if p is None:
        return True
    for layer in layers(p):
        if isinstance(layer, _ICMPv6) and layer.type in (130, 131, 132, 133, 134, 135, 136, 137, 143):
            return True
        if isinstance(layer, IP) and layer.proto == 2:
            return True
    return False


def taken(rec, p, side):
    """Whether the host's IP stack takes a packet its device received: IP of
    the kind the device announced (its protocol), with a right header, for
    one of the host's inner addresses. Anything else only passed through
    the device (the kernel hands some packets to a device that its stack
    then drops: a protocol it has no handler for, IPv4 on sit) or is
    routed on (a keepalive's inner packet)."""
    mine = set(side.me.values())
    if isinstance(p, IP):
        ok = checksum(bytes(p)[: p.ihl * 4]) == 0
        return rec.get("proto") == 0x0800 and ok and p.dst in mine
    if isinstance(p, IPv6):
        return rec.get("proto") == 0x86DD and p.dst in mine
    return False


def answer_to_own(p, side):
    """An ICMP error about a packet the side's own host sent into the tunnel
    (the gateway writes it into the device; the kernel makes it inside)."""
    mine = set(side.me.values())
    if ICMP in p and p[ICMP].type in (3, 11, 12):
        q = p[ICMP].payload
        return getattr(q, "src", None) in mine
    for layer in layers(p):
        if isinstance(layer, _ICMPv6) and layer.type in (1, 2, 3, 4):
            return getattr(layer.payload, "src", None) in mine
    return False


def summary(p, roles, depth=0):
    r = lambda a: roles.get(a, a)  # noqa: E731
    if p is None or depth > 4:
        return ""
    if isinstance(p, IP):
        raw = bytes(p)
        ihl = p.ihl * 4
        bad = checksum(raw[:ihl]) != 0 if len(raw) >= ihl else True
        s = "IPv4 %s>%s tos=%#04x ttl=%d len=%d" % (r(p.src), r(p.dst), p.tos, p.ttl, p.len)
        if p.flags.DF:
            s += " DF"
        if p.flags.MF or p.frag:
            s += " frag=%d%s" % (p.frag * 8, "+" if p.flags.MF else "")
        if bad:
            s += " BAD-HDR-CSUM"
        if p.frag:
            return s
        nxt = summary(p.payload, roles, depth + 1)
        return s + (" › " + nxt if nxt else "")
    if isinstance(p, IPv6):
        s = "IPv6 %s>%s tc=%#04x hlim=%d plen=%d" % (r(p.src), r(p.dst), p.tc, p.hlim, p.plen)
        nxt = summary(p.payload, roles, depth + 1)
        return s + (" › " + nxt if nxt else "")
    if isinstance(p, IPv6ExtHdrFragment):
        return "frag6 off=%d%s id=%d › %s" % (p.offset * 8, "+" if p.m else "", p.id,
                                             summary(p.payload, roles, depth + 1) if p.offset == 0 else "")
    if isinstance(p, (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting)):
        return "%s › %s" % (p.__class__.__name__.replace("IPv6ExtHdr", ""), summary(p.payload, roles, depth + 1))
    if isinstance(p, GRE):
        fl = "".join(c for c, on in (("C", p.chksum_present), ("R", p.routing_present), ("K", p.key_present),
                                     ("S", p.seqnum_present)) if on)
        s = "GRE%s proto=%#06x" % ("[" + fl + "]" if fl else "", p.proto)
        if p.key_present:
            s += " key=%d" % p.key
        if p.seqnum_present:
            s += " seq=%d" % p.sequence_number
        nxt = summary(p.payload, roles, depth + 1)
        return s + (" › " + nxt if nxt else "")
    if isinstance(p, UDP):
        return "UDP %d>%d len=%d" % (p.sport, p.dport, p.len)
    if isinstance(p, TCP):
        return "TCP %d>%d" % (p.sport, p.dport)
    if isinstance(p, ICMP):
        s = "ICMP %d/%d" % (p.type, p.code)
        if p.type == 3 and p.code == 4:
            s += " mtu=%d" % p.nexthopmtu
        if p.type in (3, 4, 5, 11, 12):
            s += " quoting [%s]" % summary(p.payload, roles, depth + 1)
        elif p.type in (0, 8):
            s += " id=%d seq=%d" % (p.id, p.seq)
        return s
    if isinstance(p, _ICMPv6):
        s = "ICMPv6 %d/%d" % (p.type, p.code)
        if hasattr(p, "mtu"):
            s += " mtu=%d" % p.mtu
        if p.type in (1, 2, 3, 4):
            s += " quoting [%s]" % summary(p.payload, roles, depth + 1)
        return s
    if isinstance(p, Ether):
        return "Ether type=%#06x › %s" % (p.type, summary(p.payload, roles, depth + 1))
    if isinstance(p, Raw):
        data = bytes(p)
        return "%d bytes" % len(data) if depth else "raw %d bytes (version %d)" % (len(data), data[0] >> 4 if data else -1)
    name = p.__class__.__name__
    if name in ("IPerror", "IPerror6", "UDPerror", "TCPerror", "ICMPerror", "Padding"):
        return ""
    return name


# ---------------------------------------------------------------- the cases

def case(name, group, pkts, reason=None, after=None, desc=None):
    # A reason is (why, the outcome fields it lets differ): a difference in
    # any other field still fails the case.
    why, fields = reason if reason else (None, [])
    return {"name": name, "group": group, "pkts": pkts if isinstance(pkts, list) else [pkts],
            "reason": why, "differs_in": fields, "after": after, "desc": desc}


STRICT_PEER = ("stricter by design: a tunnel with `peer` takes inner packets only from it "
               "(`inner_source_not_peer`; docs/rules.md, Other differences)")
REASM_CAP = ("outer reassembly holds at most 3800 bytes, what a 4096-byte UMEM frame takes "
             "(`fragment_too_big`; README, Limitations)")
V6_EXT = ("IPv6 extension headers on the underlay other than one encapsulation-limit option "
          "go to the kernel (`pass_ipv6_ext_header`; README, Limitations), which has no ip6 tunnel here")
NO_REPLY = ("the gateway answers no packet it refuses (no ICMP port unreachable as ip_gre sends): "
            "it cannot be used to reflect traffic or to probe which keys exist "
            "(`key_mismatch`; docs/rules.md, Other differences)")
NO_LINK_FAILURE = ("not implemented: ICMP errors other than fragmentation needed about tunnel packets "
                   "go to the host's kernel, which the gateway's tunnels do not turn into link-failure "
                   "reports to the senders as ip_tunnel_xmit's err_count does (docs/rules.md, Other differences)")
V6_FRAG_EXT = ("outer fragments whose fragment header follows the encapsulation-limit option "
               "go to the kernel, not to reassembly (README, Limitations)")

# Each reason, with the outcome fields it lets differ (the rest must match).
STRICT_PEER = (STRICT_PEER, ["delivered"])
REASM_CAP = (REASM_CAP, ["delivered"])
V6_EXT = (V6_EXT, ["delivered", "back"])
NO_REPLY = (NO_REPLY, ["back"])
NO_LINK_FAILURE = (NO_LINK_FAILURE, ["after"])
V6_FRAG_EXT = (V6_FRAG_EXT, ["delivered"])

TO_PLAIN = "I4('plain')/U()"
CONF = "The conformance suite's inbound cases"
KEYED = "K(%s)"


def cases():
    c = []
    # The conformance suite's inbound cases (tests/tests/conformance.rs).
    c += [
        case("keyless packet, keyless tunnel", CONF, "O4()/GRE()/" + TO_PLAIN),
        case("unknown key, same endpoints", CONF, "O4()/GRE(key_present=1,key=99)/" + TO_PLAIN,
             reason=NO_REPLY),
        case("key, checksum and sequence number", CONF, KEYED % "SEQ+1"),
        case("icsum tunnel, no checksum", CONF,
             "O4()/GRE(key_present=1,key=42,seqnum_present=1,sequence_number=SEQ+1)/I4('keyed')/U()"),
        case("icsum tunnel, wrong checksum", CONF,
             "O4()/GRE(key_present=1,key=42,chksum_present=1,chksum=0x1234,seqnum_present=1,"
             "sequence_number=SEQ+1)/I4('keyed')/U()"),
        case("checksum on a tunnel without icsum", CONF, "O4()/GRE(chksum_present=1)/" + TO_PLAIN),
        case("iseq tunnel, no sequence number", CONF,
             "O4()/GRE(key_present=1,key=42,chksum_present=1)/I4('keyed')/U()"),
        case("sequence number on a tunnel without iseq", CONF,
             "O4()/GRE(seqnum_present=1,sequence_number=7)/" + TO_PLAIN),
        case("GRE version 1", CONF, "O4()/GRE(version=1)/" + TO_PLAIN),
        case("GRE routing bit (R)", CONF, "O4()/GRE(routing_present=1)/" + TO_PLAIN),
        case("GRE recursion control 1", CONF, "O4()/GRE(recursion_control=1)/" + TO_PLAIN),
        case("GRE carrying Ethernet (0x6558) on a gre tunnel", CONF,
             "O4()/GRE(proto=0x6558)/Ether()/" + TO_PLAIN),
        case("inner source not the tunnel's peer", CONF,
             "O4()/GRE()/IP(src='10.9.9.9',dst=ME['plain'])/U()", reason=STRICT_PEER),
        case("outer header checksum wrong", CONF, "O4(chksum=0x1234)/GRE()/" + TO_PLAIN),
        case("sit: IPv6 in IPv4", CONF, "O4()/I6('sit')/U()"),
        case("sit: IPv4 where IPv6 belongs", CONF, "O4(proto=41)/" + TO_PLAIN),
        case("GRE from an address that is no tunnel's remote", CONF,
             "IP(src='192.168.0.77',dst=LOCAL)/GRE()/" + TO_PLAIN),
    ]
    # GRE sequence numbers (the keyed tunnel: key 42 csum seq).
    c += [
        case("seq: repeated", "GRE sequence numbers (keyed: key 42 csum seq)", [KEYED % "SEQ+1", KEYED % "SEQ+1"]),
        case("seq: a gap (SEQ+5 after SEQ+1)", "GRE sequence numbers (keyed: key 42 csum seq)", [KEYED % "SEQ+1", KEYED % "SEQ+5"]),
        case("seq: older (SEQ+2 after SEQ+3)", "GRE sequence numbers (keyed: key 42 csum seq)", [KEYED % "SEQ+3", KEYED % "SEQ+2"]),
        case("seq: wrap 0xfffffffe, 0xffffffff, 0, 1", "GRE sequence numbers (keyed: key 42 csum seq)",
             [KEYED % "0xfffffffe", KEYED % "0xffffffff", KEYED % "0", KEYED % "1"]),
        case("seq: older after 0xffffffff (0xfffffff0)", "GRE sequence numbers (keyed: key 42 csum seq)",
             [KEYED % "0xffffffff", KEYED % "0xfffffff0"]),
        case("seq: 2^31 after the last", "GRE sequence numbers (keyed: key 42 csum seq)", [KEYED % "SEQ+1", KEYED % "(SEQ+1+2**31)%2**32"]),
    ]
    # Malformed GRE, one flag at a time.
    c += [
        case("GRE C, right checksum, keyless tunnel without icsum", "Malformed GRE, one flag at a time",
             "O4()/GRE(chksum_present=1)/" + TO_PLAIN),
        case("GRE C, wrong checksum, keyless tunnel without icsum", "Malformed GRE, one flag at a time",
             "O4()/GRE(chksum_present=1,chksum=0x1234)/" + TO_PLAIN),
        case("GRE s (strict source route)", "Malformed GRE, one flag at a time", "O4()/GRE(strict_route_source=1)/" + TO_PLAIN),
        case("GRE recursion control 7", "Malformed GRE, one flag at a time", "O4()/GRE(recursion_control=7)/" + TO_PLAIN),
        case("GRE reserved flag bit 12", "Malformed GRE, one flag at a time", "O4()/GRE(flags=1)/" + TO_PLAIN),
        case("GRE reserved flag bit 8 (PPTP's acknowledgment bit)", "Malformed GRE, one flag at a time", "O4()/GRE(flags=16)/" + TO_PLAIN),
        case("GRE version 7", "Malformed GRE, one flag at a time", "O4()/GRE(version=7)/" + TO_PLAIN),
        case("GRE key on the keyless tunnel (key 7)", "Malformed GRE, one flag at a time",
             "O4()/GRE(key_present=1,key=7)/" + TO_PLAIN, reason=NO_REPLY),
        case("GRE unknown protocol 0x1234", "Malformed GRE, one flag at a time", "O4()/GRE(proto=0x1234)/" + TO_PLAIN),
        case("GRE truncated: K set, 4 bytes", "Malformed GRE, one flag at a time", "O4(proto=47)/Raw(b'\\x20\\x00\\x08\\x00')"),
        case("GRE truncated: 2 bytes", "Malformed GRE, one flag at a time", "O4(proto=47)/Raw(b'\\x00\\x00')"),
    ]
    # RFC 6040: outer x inner, for ipip, gre and ip6ip6.
    for mode, tmpl in (
        ("ipip", "O4(tos=%d)/I4('ipip',tos=%d)/U()"),
        ("gre", "O4(tos=%d)/GRE()/I4('plain',tos=%d)/U()"),
        ("ip6ip6", "O6(tc=%d)/I6('ip6ip6',tc=%d)/U()"),
    ):
        for o in range(4):
            for i in range(4):
                c.append(case("ECN %s: outer %s, inner %s" % (mode, ECN[o], ECN[i]), "ECN: RFC 6040, outer x inner",
                              tmpl % (o, i)))
    # Outer fragments.
    frags = ("fragment(O4(id=%d)/GRE()/I4('plain')/UDP(sport=1234,dport=9)/Raw(b'r'*1300), fragsize=400)")
    c += [
        case("fragments in order", "Outer fragments", frags % 4300),
        case("fragments reversed", "Outer fragments", "list(reversed(%s))" % (frags % 4301)),
        case("fragments, the first twice", "Outer fragments", "(lambda l: l[:1] + l)(%s)" % (frags % 4302)),
        # The copy comes before the datagram is whole: a copy after it would
        # start a datagram of its own on both sides, to time out 30 s later
        # in whichever case runs then.
        case("fragments, the last twice before the middle one", "Outer fragments",
             "(lambda l: l[:1] + l[-1:] + l[-1:] + l[1:-1])(%s)" % (frags % 4305)),
        case("two fragments that partly overlap", "Outer fragments",
             ["O4(id=4304,proto=47,flags='MF',frag=0)/Raw(b'a'*400)",
              "O4(id=4304,proto=47,flags='MF',frag=25)/Raw(b'b'*400)"]),
        case("fragments of a 4004-byte datagram (over 3800)", "Outer fragments",
             "fragment(O4(id=4303)/GRE()/I4('plain')/UDP(sport=1234,dport=9)/Raw(b'o'*3972), fragsize=800)",
             reason=REASM_CAP),
        case("IPv6 fragments reversed (ip6ip6)", "Outer fragments",
             "list(reversed(fragment6(O6()/IPv6ExtHdrFragment(id=4306)/I6('ip6ip6')/UDP(sport=1234,dport=9)"
             "/Raw(b's'*1300), 500)))"),
    ]
    # IPv6 extension headers in the outer header.
    tel = "IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=4,optdata=b'\\x04')])"
    c += [
        case("IPv6 outer: encapsulation-limit option (ip6ip6)", "IPv6 extension headers in the outer header",
             "O6()/%s/I6('ip6ip6')/U()" % tel),
        case("IPv6 outer: encapsulation-limit option (ip6gre)", "IPv6 extension headers in the outer header",
             "O6()/%s/GRE()/I4('ip6gre')/U()" % tel),
        case("IPv6 outer: hop-by-hop options (ip6ip6)", "IPv6 extension headers in the outer header",
             "O6()/IPv6ExtHdrHopByHop()/I6('ip6ip6')/U()", reason=V6_EXT),
        case("IPv6 outer: destination options, PadN only (ip6ip6)", "IPv6 extension headers in the outer header",
             "O6()/IPv6ExtHdrDestOpt()/I6('ip6ip6')/U()"),
        case("IPv6 outer: routing header type 0, segments left 0 (ip6ip6)", "IPv6 extension headers in the outer header",
             "O6()/IPv6ExtHdrRouting()/I6('ip6ip6')/U()", reason=V6_EXT),
        case("IPv6 outer: fragments after the encapsulation limit (ip6gre)", "IPv6 extension headers in the outer header",
             "fragment6(O6()/%s/IPv6ExtHdrFragment(id=4307)/GRE()/I4('ip6gre')/UDP(sport=1234,dport=9)"
             "/Raw(b'e'*1300), 600)" % tel, reason=V6_FRAG_EXT),
    ]
    # GRE keepalives (Cisco's: GRE local to remote inside GRE remote to local).
    c += [
        case("GRE keepalive", "GRE keepalives", "O4()/GRE()/IP(src=LOCAL,dst=REMOTE,ttl=255)/GRE(proto=0)"),
        case("GRE keepalive, inner TTL 1", "GRE keepalives", "O4()/GRE()/IP(src=LOCAL,dst=REMOTE,ttl=1)/GRE(proto=0)"),
    ]
    # ICMP errors from a router about a tunnel packet; then a large packet
    # into the tunnel from the side's own host. Last: they change the path MTU.
    def big(peer, size, then_small=False):
        """A DF datagram of `size` bytes (IPv4) into the tunnel from the side's
        own host, then the route to the peer as `ip route get` shows it once
        its MTU has changed from what it was before (or after 10 s); with
        `then_small`, a 200-byte datagram after it (seen on the wire)."""
        return ("/usr/bin/python3 -c \"import socket,subprocess,time\n"
                "def mtu():\n"
                " o=subprocess.run(['ip','route','get','{PEER_%s}'],capture_output=True,text=True).stdout\n"
                " w=o.split(' mtu ')[1].split() if ' mtu ' in o else ['none']\n"
                " return ' '.join(w[:2]) if w[0]=='lock' else w[0]\n"
                "m0=mtu()\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "s.bind(('',4321))\n"
                "s.setsockopt(socket.IPPROTO_IP,10,2)\n"
                "try:\n s.sendto(b'b'*%d,('{PEER_%s}',9)); r='sent'\nexcept OSError as e:\n r=e.strerror\n"
                "m=m0\n"
                "t=time.time()\n"
                "while time.time()-t<10:\n"
                " m=mtu()\n"
                " if m!=m0: break\n"
                " time.sleep(0.1)\n"
                "%s"
                "print('a %d-byte DF datagram into the tunnel: %%s; route to the peer: mtu %%s' %% (r, m))\""
                % (peer, size - 28, peer,
                   "s.setsockopt(socket.IPPROTO_IP,10,0)\ns.sendto(b's'*172,('{PEER_%s}',9))\n" % peer
                   if then_small else "", size))

    unreach = ("/usr/bin/python3 -c \"import os,socket,time\n"
               "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
               "s.bind(('',4322))\n"
               "s.setsockopt(socket.IPPROTO_IP,11,1)\n"
               "s.connect(('{PEER_plain}',9)); s.send(b'x')\n"
               "e=0\n"
               "t=time.time()\n"
               "while time.time()-t<10:\n"
               " e=s.getsockopt(socket.SOL_SOCKET,socket.SO_ERROR)\n"
               " if e: break\n"
               " time.sleep(0.05)\n"
               "print('a datagram into the tunnel on a connected socket (IP_RECVERR): %s' "
               "% (os.strerror(e) if e else 'no error came back'))\"")
    quote4 = "IP(src=LOCAL,dst=REMOTE,flags='DF')/GRE()/IP(src=ME['plain'],dst=PEER['plain'])/UDP(sport=9,dport=1234)"
    quote6 = ("IPv6(src=LOCAL6,dst=REMOTE6)/%s/GRE()/IP(src=ME['ip6gre'],dst=PEER['ip6gre'])"
              "/UDP(sport=9,dport=1234)" % tel)
    c += [
        case("ICMP frag needed (mtu 1300) from a router about a gre packet, then 1400 bytes DF",
             "ICMP errors from a router about tunnel packets",
             "IP(src=ROUTER,dst=LOCAL)/ICMP(type=3,code=4,nexthopmtu=1300)/" + quote4,
             after=big("plain", 1400)),
        case("ICMP host unreachable from a router about a gre packet, then a datagram into the tunnel",
             "ICMP errors from a router about tunnel packets",
             "IP(src=ROUTER,dst=LOCAL)/ICMP(type=3,code=1)/" + quote4, after=unreach,
             reason=NO_LINK_FAILURE),
        case("ICMP frag needed about a gre packet, addressed to another host",
             "ICMP errors from a router about tunnel packets",
             "IP(src=ROUTER,dst='192.168.0.99')/ICMP(type=3,code=4,nexthopmtu=600)/" + quote4),
        case("ICMP frag needed (mtu 400, under 552), then 1000 bytes DF, then 200 bytes",
             "ICMP errors from a router about tunnel packets",
             "IP(src=ROUTER,dst=LOCAL)/ICMP(type=3,code=4,nexthopmtu=400)/" + quote4,
             after=big("plain", 1000, then_small=True)),
        case("ICMPv6 packet too big (1300) from a router about an ip6gre packet, then 1400 bytes DF",
             "ICMP errors from a router about tunnel packets",
             "IPv6(src=ROUTER6,dst=LOCAL6)/ICMPv6PacketTooBig(mtu=1300)/" + quote6,
             after=big("ip6gre", 1400)),
        case("ICMPv6 packet too big (1000, under 1280), then 1240 bytes DF", "ICMP errors from a router about tunnel packets",
             "IPv6(src=ROUTER6,dst=LOCAL6)/ICMPv6PacketTooBig(mtu=1000)/" + quote6,
             after=big("ip6gre", 1240)),
    ]
    return c


# ---------------------------------------------------------------- counters

NOISE = ("Octets", "InReceives", "InDelivers", "OutRequests", "ECT", "CEPkts", "Mcast", "Bcast",
         "Echo", "InMsgs", "OutMsgs", "Neighbor", "Router", "MLD", "Group", "InType", "OutType",
         "Datagrams", "rx_bytes", "tx_bytes", "tx_packets", "multicast", "Tcp.", "TcpExt.", "MPTcp",
         "UdpLite", "Udp6", "Icmp6InErrors")


def interesting(side, key):
    if side == "kernel":
        if key.startswith(("lo.", "eth0.rx_packets", "ens0.", "br0.")):
            return False
        return not any(n in key for n in NOISE)
    return True


def deltas(side, before, after, base):
    out = {}
    for k, v in after.items():
        d = v - before.get(k, 0) - base.get(k, 0)
        if d and interesting(side, k):
            out[k] = d
    return out


# ---------------------------------------------------------------- the run

def main():
    sides = {
        "kernel": Side("kernel", cfg["kernel"], cfg["kernel"]["iface"]),
        "gateway": Side("gateway", cfg["gateway"], cfg["gateway"]["iface"]),
    }
    state = {"fence": 0, "last_seq": 0}
    env_base = dict(GRE=GRE, IP=IP, IPv6=IPv6, UDP=UDP, ICMP=ICMP, Ether=Ether, Raw=Raw,
                    ICMPv6PacketTooBig=ICMPv6PacketTooBig, IPv6ExtHdrDestOpt=IPv6ExtHdrDestOpt,
                    IPv6ExtHdrHopByHop=IPv6ExtHdrHopByHop, IPv6ExtHdrRouting=IPv6ExtHdrRouting,
                    IPv6ExtHdrFragment=IPv6ExtHdrFragment, HBHOptUnknown=HBHOptUnknown, PadN=PadN,
                    fragment=fragment, fragment6=fragment6, ROUTER=ROUTER, ROUTER6=ROUTER6)

    def env(s, seq):
        e = dict(env_base)
        e.update(LOCAL=s.local, REMOTE=s.remote, LOCAL6=s.local6, REMOTE6=s.remote6, ME=s.me, PEER=s.peer,
                 SEQ=seq,
                 O4=lambda **kw: IP(src=s.remote, dst=s.local, **kw),
                 O6=lambda **kw: IPv6(src=s.remote6, dst=s.local6, **kw),
                 I4=lambda l, **kw: IP(src=s.peer[l], dst=s.me[l], **kw),
                 I6=lambda l, **kw: IPv6(src=s.peer[l], dst=s.me[l], **kw),
                 U=lambda: UDP(sport=1234, dport=9) / Raw(b"differential"),
                 K=lambda n: IP(src=s.remote, dst=s.local) / GRE(key_present=1, key=42, chksum_present=1,
                                                                 seqnum_present=1, sequence_number=n)
                 / IP(src=s.peer["keyed"], dst=s.me["keyed"]) / UDP(sport=1234, dport=9) / Raw(b"differential"))
        return e

    def build(s, exprs, seq):
        e = env(s, seq)
        out = []
        for x in exprs:
            v = eval(x, e)
            out += v if isinstance(v, list) else [v]
        return [s.frame(p) for p in out]

    def keyed_seqs(frames):
        out = []
        for f in frames:
            if GRE in f and f[GRE].key_present and f[GRE].key == 42 and f[GRE].seqnum_present \
                    and not (IP in f and f[IP].frag):
                out.append(f[GRE].sequence_number)
        return out

    def fence_all():
        state["fence"] += 1
        n = state["fence"]
        marks = {}
        for s in sides.values():
            with s.lock:
                w = len(s.wire)
            s.read_log()
            marks[s.name] = (w, len(s.log))
            s.send([s.fence_frame(n)])
        start = time.time()
        waiting = set(sides)
        while waiting:
            for name in list(waiting):
                if fenced(sides[name], n, *marks[name]):
                    waiting.discard(name)
            if waiting and time.time() - start > 300:
                raise RuntimeError("the fence did not come back from %s within 300 s" % sorted(waiting))
            time.sleep(0.02)

    def outcome(s, wire_from, log_from, before, after, base, after_out):
        s.read_log()
        delivered, through, answers = [], [], []
        for r in s.log[log_from:]:
            label = DEVICES[s.name].get(r["if"], "device " + r["if"])
            for p in parse_dev(r):
                if chatter(p) or is_fence(p, 8):
                    continue
                text = "%s: %s" % (label, summary(p, s.roles))
                if not taken(r, p, s):
                    through.append(text + (" (protocol %#06x)" % r["proto"] if r.get("proto") not in (0x0800, 0x86DD) else ""))
                elif answer_to_own(p, s):
                    answers.append(text)
                else:
                    delivered.append(text)
        with s.lock:
            frames = s.wire[wire_from:]
        back = []
        for f in frames:
            e = Ether(f)
            if e.type not in (0x0800, 0x86DD) or chatter(e) or is_fence(e, 0):
                continue
            back.append(summary(e.payload, s.roles))
        return {"delivered": delivered, "through": through, "answers": answers, "back": back,
                "counters": deltas(s.name, before, after, base), "after": after_out}

    def verdict_key(o):
        return json.dumps([o["delivered"], o["back"], o["after"]])

    # Warm up (ARP through the tap, first packets), then the fence alone
    # twice: the second's counter deltas are the fence's own, taken off every
    # case's.
    fence_all()
    snap = {n: s.counters() for n, s in sides.items()}
    base = {}
    for _ in range(2):
        fence_all()
        now = {n: s.counters() for n, s in sides.items()}
        base = {n: {k: v - snap[n].get(k, 0) for k, v in now[n].items()} for n in sides}
        snap = now
    results = []
    only = cfg.get("only") or []
    all_cases = cases()
    names = [c["name"] for c in all_cases]
    for o in only:
        if o not in names:
            raise SystemExit("no case named %r; the cases: %s" % (o, names))
    for c in all_cases:
        if only and c["name"] not in only:
            continue
        t0 = time.time()
        last = state["last_seq"]
        seq = (last + (1 << 29)) % (1 << 32)
        frames = {n: build(s, c["pkts"], seq) for n, s in sides.items()}
        seqs = keyed_seqs(frames["kernel"])
        steps = []
        if seqs:
            first = seqs[0]
            while not (0 < (first - last) % (1 << 32) < (1 << 30)):
                last = (last + (1 << 30)) % (1 << 32)
                steps.append(last)
            for v in seqs:
                if 0 < (v - last) % (1 << 32) < (1 << 31):
                    last = v
            state["last_seq"] = last
        marks = {}
        for n, s in sides.items():
            with s.lock:
                w = len(s.wire)
            s.read_log()
            marks[n] = (w, len(s.log))
            pre = build(s, [KEYED % v for v in steps], seq) if steps else []
            s.send(pre + frames[n])
        after_out = {}
        if c["after"]:
            for n, s in sides.items():
                cmd = c["after"]
                for l in INNER:
                    cmd = cmd.replace("{PEER_%s}" % l, s.peer[l])
                r = s.sh(cmd)
                after_out[n] = r["out"].strip()
        fence_all()
        now = {n: s.counters() for n, s in sides.items()}
        outs = {}
        for n, s in sides.items():
            outs[n] = outcome(s, marks[n][0], marks[n][1], snap[n], now[n], base[n],
                              after_out.get(n, ""))
        snap = now
        same = verdict_key(outs["kernel"]) == verdict_key(outs["gateway"])
        differing = [f for f in ("delivered", "back", "after")
                     if json.dumps(outs["kernel"][f]) != json.dumps(outs["gateway"][f])]
        explained = bool(c["reason"]) and all(f in c["differs_in"] for f in differing)
        verdict = "same" if same else ("kept" if explained else "differs")
        pkt = c["desc"] or " + ".join(c["pkts"])
        if steps:
            pkt = "(%d step packets to bring the sequence number near) " % len(steps) + pkt
        results.append({
            "name": c["name"], "group": c["group"], "packet": pkt,
            "packets_sent": len(frames["kernel"]) + len(steps),
            "kernel": outs["kernel"], "gateway": outs["gateway"],
            "verdict": verdict, "reason": c["reason"], "differs_in": c["differs_in"], "seconds": round(time.time() - t0, 2),
        })
        print("[differential] %-8s %s (%.1f s)" % (verdict, c["name"], time.time() - t0), file=sys.stderr,
              flush=True)
    with open(cfg["out"] + ".tmp", "w") as f:
        json.dump({"cases": results, "fence_baseline": base}, f, indent=1)
    os.rename(cfg["out"] + ".tmp", cfg["out"])


main()
