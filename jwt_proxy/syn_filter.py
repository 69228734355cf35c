"""Stop a listening socket from taking new connections while keeping its accept queue.

At a stop, each worker takes the connections queued on its socket and then closes it.
Closing a listening socket resets every connection still queued on it, and the kernel
keeps completing handshakes until the close, so a connection that arrives between a
worker's last ``accept`` and its ``close`` would be reset instead of refused. Linux has
no call that stops a listening socket from answering SYNs without also discarding its
queue (``shutdown`` on a listener resets the queue too).

A socket filter (``SO_ATTACH_FILTER``, classic BPF, no privileges needed) does: TCP runs
a listener's filter on every segment it receives, so a filter that drops segments with
the SYN flag set stops new handshakes, while the final ACKs of handshakes already begun
still reach the queue. A client whose SYN is dropped retransmits it after about a
second, when the socket is closed, and gets a plain "connection refused".
"""

from __future__ import annotations

import ctypes
import socket

# <linux/filter.h>, <asm-generic/socket.h>: stable kernel ABI.
SO_ATTACH_FILTER = 26
_BPF_LD_B_ABS = 0x00 | 0x10 | 0x20  # BPF_LD | BPF_B | BPF_ABS: load the byte at offset k
_BPF_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K: jump by whether A & k
_BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K: keep k bytes of the segment (0: drop it)
# A socket filter on TCP sees the segment from its TCP header: byte 13 holds the flags.
_TCP_FLAGS_OFFSET = 13
_TCP_SYN = 0x02
_KEEP_ALL = 0xFFFFFFFF


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


# if (tcp_flags & SYN) drop; else keep.
_DROP_SYN = (_SockFilter * 4)(
    _SockFilter(_BPF_LD_B_ABS, 0, 0, _TCP_FLAGS_OFFSET),
    _SockFilter(_BPF_JSET_K, 0, 1, _TCP_SYN),
    _SockFilter(_BPF_RET_K, 0, 0, 0),
    _SockFilter(_BPF_RET_K, 0, 0, _KEEP_ALL),
)


def refuse_new_connections(sock: socket.socket) -> None:
    """Drop every SYN that reaches ``sock`` from now on; queued connections stay.

    The kernel copies the program at the call, so the ctypes arrays need not outlive it.
    Raises ``OSError`` where socket filters are not available.
    """
    program = _SockFprog(len(_DROP_SYN), _DROP_SYN)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(program))
