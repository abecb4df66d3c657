"""A minimal AF_XDP receiver, as QEMU's or DPDK's would be in a pod, for traffic tests.

One socket with its own UMEM, a fill ring handed every frame up front, and
an RX ring polled for what arrived (kernel uapi ``linux/if_xdp.h``). Copy
mode (XDP_COPY) binds without driver support, so it works on a netkit whose
queue is leased from netdevsim (the VM tests); zero-copy needs a NIC
(scripts/hw-validate-afxdp).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import struct
import time

from cni_netkit.kernel import netns

AF_XDP, SOL_XDP = 44, 283
XDP_MMAP_OFFSETS, XDP_RX_RING, XDP_UMEM_REG = 1, 2, 4
XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_OPTIONS = 5, 6, 8
XDP_COPY, XDP_ZEROCOPY = 1 << 1, 1 << 2
XDP_OPTIONS_ZEROCOPY = 1
XDP_PGOFF_RX_RING, XDP_UMEM_PGOFF_FILL_RING = 0, 0x100000000

FRAME_SIZE = 2048
RING = 16  # entries of every ring and frames of the UMEM (a power of two)

_libc = ctypes.CDLL(None, use_errno=True)


class XskReceiver:
    """An AF_XDP socket bound to ``queue`` of ``ifindex`` in netns ``netns_path``.

    Copy mode, or zero-copy (the bind fails where the driver cannot) with ``zerocopy``.
    """

    def __init__(self, netns_path: str, ifindex: int, queue: int, *, zerocopy: bool = False
                 ) -> None:
        nsfd = netns.open_netns(netns_path)
        try:
            # bind() resolves the ifindex in the socket's netns: make it in the pod's.
            self.sock = netns.socket_in(nsfd, AF_XDP, socket.SOCK_RAW, 0)
        finally:
            os.close(nsfd)
        fd = self.sock.fileno()
        self.umem = mmap.mmap(-1, RING * FRAME_SIZE)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.umem))
        # struct xdp_umem_reg: addr, len, chunk_size, headroom, flags, tx_metadata_len
        self.sock.setsockopt(SOL_XDP, XDP_UMEM_REG,
                             struct.pack("QQIIII", addr, len(self.umem), FRAME_SIZE, 0, 0, 0))
        for ring in (XDP_UMEM_FILL_RING, XDP_UMEM_COMPLETION_RING, XDP_RX_RING):
            self.sock.setsockopt(SOL_XDP, ring, RING)
        # struct xdp_mmap_offsets: {producer, consumer, desc, flags} for rx, tx, fill, completion
        offsets = struct.unpack("16Q", self.sock.getsockopt(SOL_XDP, XDP_MMAP_OFFSETS, 128))
        self.rx_prod, self.rx_cons, self.rx_desc = offsets[0:3]
        fill_prod, _, fill_desc = offsets[8:11]
        self.rx = mmap.mmap(fd, self.rx_desc + RING * 16, offset=XDP_PGOFF_RX_RING)
        self.fill = mmap.mmap(fd, fill_desc + RING * 8, offset=XDP_UMEM_PGOFF_FILL_RING)
        for i in range(RING):
            struct.pack_into("Q", self.fill, fill_desc + 8 * i, i * FRAME_SIZE)
        struct.pack_into("I", self.fill, fill_prod, RING)
        # struct sockaddr_xdp: family, flags, ifindex, queue_id, shared_umem_fd
        sxdp = ctypes.create_string_buffer(
            struct.pack("HHIII", AF_XDP, XDP_ZEROCOPY if zerocopy else XDP_COPY, ifindex, queue, 0))
        if _libc.bind(fd, sxdp, len(sxdp.raw)) != 0:
            err = ctypes.get_errno()
            self.close()
            raise OSError(err, f"bind AF_XDP to ifindex {ifindex} queue {queue}: "
                               f"{os.strerror(err)}")

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def zerocopy(self) -> bool:
        """The kernel's word on the bound socket's mode (XDP_OPTIONS)."""
        (options,) = struct.unpack("I", self.sock.getsockopt(SOL_XDP, XDP_OPTIONS, 4))
        return bool(options & XDP_OPTIONS_ZEROCOPY)

    def receive(self, timeout: float = 2.0) -> list[bytes]:
        """Frames that arrived, waiting up to ``timeout`` s for the first one."""
        deadline = time.monotonic() + timeout
        while True:
            # A recvmsg kicks the driver (ndo_xsk_wakeup) in zero-copy mode; a no-op in copy mode.
            with contextlib.suppress(OSError):
                self.sock.recv(0, socket.MSG_DONTWAIT)
            (prod,) = struct.unpack_from("I", self.rx, self.rx_prod)
            (cons,) = struct.unpack_from("I", self.rx, self.rx_cons)
            if prod != cons or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        frames = []
        for i in range(cons, prod):
            addr, length, _ = struct.unpack_from("QII", self.rx, self.rx_desc + 16 * (i % RING))
            frames.append(bytes(self.umem[addr:addr + length]))
        struct.pack_into("I", self.rx, self.rx_cons, prod)
        return frames

    def close(self) -> None:
        self.sock.close()
