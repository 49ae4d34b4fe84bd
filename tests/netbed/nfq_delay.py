#!/usr/bin/env python3
"""Delays (and optionally drops) the packets of one NFQUEUE queue.

The test bed's kernel has no `sch_netem`, so latency and jitter are made
here: iptables sends a link's packets to an NFQUEUE queue, and this process
holds each one for `delay ± jitter` (uniform, independently per packet, so
jitter may reorder packets as netem's does) before accepting it, or drops it
with probability `loss`. It speaks nfnetlink_queue over a raw netlink socket
(standard library only) and must run in the network namespace of the
iptables rule, as root.

    nfq_delay.py QUEUE DELAY_MS JITTER_MS LOSS_PERCENT

It prints `ready` once bound, and runs until killed. Packets still held
when it dies are dropped by the kernel (no `--queue-bypass`), so a crashed
delayer shows as a blackhole, never as a silently healthy link.
"""

import heapq
import os
import random
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NF_DROP = 0
NF_ACCEPT = 1
SO_RCVBUFFORCE = 33


def attr(kind, payload):
    length = 4 + len(payload)
    pad = (4 - length % 4) % 4
    return struct.pack("=HH", length, kind) + payload + b"\0" * pad


def message(kind, flags, seq, queue, attrs):
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + b"".join(attrs)
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0)
    return header + body


def configure(sock, queue):
    requests = [
        attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, 0)),
        attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
        attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)),
    ]
    for seq, request in enumerate(requests, start=1):
        sock.send(message(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue, [request]))
        reply = sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error != 0:
                sys.exit(f"nfq_delay: configuring queue {queue} failed: {os.strerror(-error)}")


def packet_ids(data):
    """The packet ids of every queued-packet message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
        if length < 16:
            return
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            at = offset + 20
            end = offset + length
            while at + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, at)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    (packet_id,) = struct.unpack_from("!I", data, at + 4)
                    yield packet_id
                    break
                at += (alen + 3) & ~3
        offset += (length + 3) & ~3


def main():
    queue, delay_ms, jitter_ms, loss = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    sock.bind((0, 0))
    configure(sock, queue)
    print("ready", flush=True)
    held = []  # (due, packet id)
    seq = 100
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, packet_id = heapq.heappop(held)
            seq += 1
            verdict = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
            sock.send(message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, seq, queue, [verdict]))
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 1.0
        readable, _, _ = select.select([sock], [], [], timeout)
        if not readable:
            continue
        try:
            data = sock.recv(1 << 20)
        except OSError:
            # ENOBUFS: the kernel dropped queued packets we could not read in time.
            continue
        arrived = time.monotonic()
        for packet_id in packet_ids(data):
            if random.random() * 100.0 < loss:
                seq += 1
                verdict = attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_DROP, packet_id))
                sock.send(message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, seq, queue, [verdict]))
                continue
            wait = max(0.0, delay_ms + random.uniform(-jitter_ms, jitter_ms)) / 1000.0
            heapq.heappush(held, (arrived + wait, packet_id))


if __name__ == "__main__":
    main()
