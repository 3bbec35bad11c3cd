#!/usr/bin/env python3
"""Write the fuzz targets' seed inputs to fuzz/corpus/<target>/seed-*.

Each seed is a small, valid (or deliberately broken) guest: the layouts
follow fuzz/src/lib.rs (4-byte queue header, then guest RAM from address 0,
rings packed from 0). Run again after changing an input layout.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE, INDIRECT = 1, 2, 4


class Guest:
    """Guest RAM image with one queue of `size` entries at address 0."""

    def __init__(self, size=16):
        self.size = size
        self.ram = bytearray(0x800)
        self.avail = 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.heads = []

    def put(self, addr, data):
        end = addr + len(data)
        if end > len(self.ram):
            self.ram.extend(bytes(end - len(self.ram)))
        self.ram[addr:end] = data

    def desc(self, table, index, addr, length, flags, nxt=0):
        self.put(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, first, descs):
        """Linked descriptors from `first` in the queue's table; offer the head."""
        for i, (addr, length, flags) in enumerate(descs):
            more = i + 1 < len(descs)
            self.desc(0, first + i, addr, length, flags | (NEXT if more else 0), first + i + 1 if more else 0)
        self.heads.append(first)

    def indirect(self, head, table, descs):
        for i, (addr, length, flags) in enumerate(descs):
            more = i + 1 < len(descs)
            self.desc(table, i, addr, length, flags | (NEXT if more else 0), i + 1 if more else 0)
        self.desc(0, head, table, 16 * len(descs), INDIRECT)
        self.heads.append(head)

    def image(self, avail_idx=None):
        for i, h in enumerate(self.heads):
            self.put(self.avail + 4 + 2 * i, struct.pack("<H", h))
        idx = len(self.heads) if avail_idx is None else avail_idx
        self.put(self.avail + 2, struct.pack("<H", idx))
        return bytes(self.ram)


def header(size=16, start=0, flags=0):
    return bytes([size.bit_length() - 1]) + struct.pack("<H", start) + bytes([flags])


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def blk_header(g, addr, kind, sector):
    g.put(addr, struct.pack("<IIQ", kind, 0, sector))


def block_seeds():
    g = Guest()
    blk_header(g, 0x400, 0, 1)  # IN
    g.chain(0, [(0x400, 16, 0), (0x600, 512, WRITE), (0x7f0, 1, WRITE)])
    blk_header(g, 0x410, 1, 2)  # OUT
    g.chain(3, [(0x410, 16, 0), (0x600, 512, 0), (0x7f1, 1, WRITE)])
    blk_header(g, 0x420, 4, 0)  # FLUSH
    g.chain(6, [(0x420, 16, 0), (0x7f2, 1, WRITE)])
    blk_header(g, 0x430, 8, 0)  # GET_ID
    g.chain(8, [(0x430, 16, 0), (0x440, 20, WRITE), (0x7f3, 1, WRITE)])
    requests = g.image()
    g = Guest()
    blk_header(g, 0x400, 0, 0)
    g.indirect(0, 0x1000, [(0x400, 16, 0), (0x600, 512, WRITE), (0x7f0, 1, WRITE)])
    indirect = g.image()
    g = Guest()
    blk_header(g, 0x400, 0, 0)
    g.indirect(0, 0x1000, [(0x400, 16, 0)] + [(0x600, 0, WRITE)] * 30 + [(0x7f0, 1, WRITE)])
    too_long = g.image()
    g = Guest()
    g.chain(0, [(0x400, 16, 0), (0x7f0, 1, WRITE)])
    broken = g.image(avail_idx=40)
    for target in ("block_request", "block_queue"):
        write(target, "requests", header() + requests)
        write(target, "indirect", header() + indirect)
        write(target, "too-long", header(flags=1) + too_long)
        write(target, "avail-index", header() + broken)
        write(target, "wrapping", header(start=0xffff) + requests)
    # The io_uring engine (block_queue's flag 4).
    write("block_queue", "requests-async", header(flags=4) + requests)
    write("block_queue", "indirect-async", header(flags=4) + indirect)


def net_seeds():
    g = Guest()
    g.chain(0, [(0x400, 12, 0), (0x500, 60, 0)])
    g.indirect(2, 0x1000, [(0x400, 12, 0), (0x500, 200, 0)])
    g.chain(3, [(0x400, 72, WRITE)])  # wrong direction
    write("net_tx", "frames", header() + g.image())
    g = Guest()
    g.indirect(0, 0x1000, [(0x400, 12, 0)] + [(0x500, 1, 0)] * 40)
    write("net_tx", "too-long", header() + g.image())
    write("net_tx", "avail-index", header() + Guest().image(avail_idx=300))

    frames = bytes([3]) + struct.pack("<HB", 50, 0) + struct.pack("<HB", 1500, 2) + struct.pack("<HB", 4, 0)
    g = Guest()
    for i in range(4):
        g.chain(i, [(0x2000 + 0x800 * i, 2048, WRITE)])
    g.chain(4, [(0x4000, 12, WRITE), (0x4100, 4096, WRITE)])
    write("net_rx", "mergeable", header(flags=0x33) + frames + g.image())
    write("net_rx", "plain", header(flags=0x10) + frames + g.image())
    g = Guest()
    g.indirect(0, 0x1000, [(0x2000, 64, WRITE)] * 20)
    write("net_rx", "too-long", header(flags=1) + frames + g.image())


def mmio_seeds():
    def op(reg, value, read=False):
        return bytes([0x10 if read else 0, reg]) + struct.pack("<I", value)

    def handshake(avail):
        ops = [op(0x70, 1), op(0x70, 3), op(0x24, 1), op(0x20, 1), op(0x24, 0), op(0x20, 8), op(0x70, 0xB)]
        ops += [op(0x30, 0), op(0x34, 0, True), op(0x38, 16), op(0x80, 0), op(0x84, 0)]
        ops += [op(0x90, avail), op(0x94, 0), op(0xA0, 0x200), op(0xA4, 0), op(0x44, 1)]
        ops += [op(0x70, 0xF), op(0x70, 0, True), op(0x50, 0), op(0x60, 0, True), op(0x64, 3)]
        ops += [op(0x08, 0, True), op(0xFC, 0, True), op(0x70, 0), op(0x70, 1)]
        return struct.pack("<H", len(ops)) + b"".join(ops)

    g = Guest()
    g.avail = 0x100
    g.chain(0, [(0x400, 16, NEXT), (0x500, 1, WRITE)])
    write("mmio_transport", "handshake", handshake(0x100) + g.image())
    write("mmio_transport", "avail-at-zero", handshake(0) + g.image())
    write("mmio_transport", "avail-index", handshake(0x100) + g.image(avail_idx=40))


def console_seeds():
    g = Guest()
    g.put(0x400, b"hello, world\r\n")
    g.chain(0, [(0x400, 7, 0), (0x407, 7, 0)])
    g.indirect(2, 0x1000, [(0x400, 14, 0), (0x400, 14, 0)])
    g.chain(3, [(0x500, 64, WRITE)])  # wrong direction for TX
    write("console_queues", "tx", header() + g.image())
    g = Guest()
    g.indirect(0, 0x1000, [(0x400, 1, 0)] * 40)
    write("console_queues", "tx-too-long", header() + g.image())
    write("console_queues", "avail-index", header() + Guest().image(avail_idx=300))
    g = Guest()
    g.chain(0, [(0x400, 4, WRITE)])
    g.chain(1, [(0x500, 3, WRITE), (0x600, 32, WRITE)])
    g.chain(3, [(0x700, 16, 0)])  # wrong direction for RX
    g.indirect(4, 0x1000, [(0x700, 8, WRITE)] * 3)
    write("console_queues", "rx", header(flags=(9 << 1) | 1) + g.image())


def rng_seeds():
    g = Guest()
    g.chain(0, [(0x400, 16, WRITE), (0x500, 64, WRITE)])
    g.chain(2, [(0x600, 32, 0)])  # wrong direction
    g.indirect(3, 0x1000, [(0x700, 8, WRITE)] * 3)
    write("rng_queue", "requests", header() + g.image())
    write("rng_queue", "failing-source", header(flags=1) + g.image())
    write("rng_queue", "avail-index", header() + Guest().image(avail_idx=300))


def vsock_seeds():
    def hdr(src_port, dst_port, op, length=0, flags=0):
        # src_cid 3, dst_cid 2 (the host), type STREAM.
        return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, flags, 1 << 18, 0)

    g = Guest()
    g.put(0x400, hdr(1000, 7, 1))  # REQUEST to a port nobody listens on
    g.chain(0, [(0x400, 44, 0)])
    g.put(0x480, hdr(1001, 7, 5, length=5) + b"hello")  # RW, header and payload together
    g.chain(1, [(0x480, 49, 0)])
    g.put(0x500, hdr(1002, 7, 5, length=3))  # RW, payload in a second buffer
    g.put(0x540, b"abc")
    g.chain(2, [(0x500, 44, 0), (0x540, 3, 0)])
    g.put(0x580, hdr(1003, 7, 5, length=60000))  # payload longer than its buffers
    g.chain(4, [(0x580, 44, 0)])
    g.chain(5, [(0x600, 20, 0)])  # shorter than a header
    g.chain(6, [(0x640, 44, WRITE)])  # wrong direction
    write("vsock_queues", "tx", header() + g.image())
    write("vsock_queues", "tx-avail-index", header() + Guest().image(avail_idx=300))
    g = Guest()
    g.chain(0, [(0x400, 44, WRITE), (0x440, 64, WRITE)])
    g.chain(2, [(0x500, 20, WRITE)])  # too short for a header
    g.chain(3, [(0x540, 64, 0)])  # wrong direction
    g.indirect(4, 0x1000, [(0x600, 16, WRITE)] * 4)
    write("vsock_queues", "rx", header(flags=1 | (5 << 2)) + g.image())
    g = Guest()
    g.chain(0, [(0x400, 2, WRITE)])  # too short for an event
    g.chain(1, [(0x440, 4, WRITE)])
    write("vsock_queues", "event", header(flags=3) + g.image())


block_seeds()
net_seeds()
mmio_seeds()
console_seeds()
rng_seeds()
vsock_seeds()
