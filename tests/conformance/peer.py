#!/usr/bin/python3
"""The conformance suite's far end, built on scapy (an independent packet
library: none of the gateway's code). Runs inside the peer's network
namespace and answers one JSON command per line on stdin:

  {"op": "send", "pkt": "<scapy expression>"}
      builds the packet (names GW_MAC, LOCAL, REMOTE are defined) and sends
      it out of ens0; answers {"ok": true}.
  {"op": "decode", "hex": "<frame>"}
      dissects a captured Ethernet frame and answers the outer and GRE
      fields, and whether the GRE checksum is right.
"""
import json
import sys

from scapy.all import (  # noqa: F401
    GRE,
    ICMP,
    IP,
    UDP,
    Ether,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    Raw,
    conf,
    fragment,
    fragment6,
    sendp,
)
from scapy.utils import checksum

conf.verb = 0
env = {
    "Ether": Ether,
    "IP": IP,
    "IPv6": IPv6,
    "ICMP": ICMP,
    "fragment": fragment,
    "ICMPv6PacketTooBig": ICMPv6PacketTooBig,
    "IPv6ExtHdrDestOpt": IPv6ExtHdrDestOpt,
    "IPv6ExtHdrFragment": IPv6ExtHdrFragment,
    "fragment6": fragment6,
    "GRE": GRE,
    "UDP": UDP,
    "Raw": Raw,
    "GW_MAC": sys.argv[1],
    "LOCAL": "192.168.0.8",
    "REMOTE": "192.168.0.58",
}


def decode(hexstr):
    f = Ether(bytes.fromhex(hexstr))
    out = {}
    if IP not in f:
        return {"ip": False}
    ip = f[IP]
    out.update(
        ip=True,
        tos=ip.tos,
        df=bool(ip.flags & 2),
        ttl=ip.ttl,
        proto=ip.proto,
        src=ip.src,
        dst=ip.dst,
    )
    if GRE in f:
        g = f[GRE]
        out.update(
            gre_key=g.key if g.key_present else None,
            gre_seq=g.sequence_number if g.seqnum_present else None,
            gre_csum_present=bool(g.chksum_present),
            gre_proto=g.proto,
        )
        if g.chksum_present:
            raw = bytes(g)
            out["gre_csum_ok"] = checksum(raw) == 0
        inner = g.payload
    else:
        inner = ip.payload
    out["inner_v6"] = isinstance(inner, IPv6)
    if isinstance(inner, IP):
        out.update(inner_tos=inner.tos, inner_df=bool(inner.flags & 2), inner_ttl=inner.ttl)
    return out


for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "send":
            pkt = eval(cmd["pkt"], env)  # the test's own expressions
            sendp(pkt, iface="ens0")
            reply = {"ok": True}
        elif cmd["op"] == "decode":
            reply = decode(cmd["hex"])
        else:
            reply = {"error": "unknown op"}
    except Exception as e:  # report, keep serving
        reply = {"error": repr(e)}
    print(json.dumps(reply), flush=True)
