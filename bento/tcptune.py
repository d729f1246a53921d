"""TCP congestion control for connections between two processes on this host.

A neutral helper: stdlib only, it knows nothing of the server or the clients,
and both use it on their own end of a connection (the server's transport and
the SDK's link). A connection whose peer is this host (loopback, or this
host's own address) crosses no network, so there is nothing to pace and no
queue to probe; a pacing algorithm such as BBR still paces it at its estimate
of the delivery rate, which on this host follows how the reading process is
scheduled (measured in docs/performance.md). So a same-host connection is
switched to a loss-based algorithm (cubic, or reno, which any process may
choose) when the system default is anything else; every other connection
keeps the system's choice.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

# Loss-based algorithms: on a link with no loss they send as fast as the peer reads.
PLAIN = (b"cubic", b"reno")
TCP_CONGESTION: int | None = getattr(socket, "TCP_CONGESTION", None)  # Linux only


def same_host(peer: str, local: str) -> bool:
    """Whether ``peer`` is this host as seen from a socket bound to ``local``."""
    try:
        ip = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or peer == local


def stream_socket(stream: Any) -> Any:
    """The socket under a trio stream, plain or TLS; None if it has none."""
    return getattr(stream, "socket", None) or getattr(getattr(stream, "transport_stream", None), "socket", None)


def congestion(sock: Any) -> bytes:
    assert TCP_CONGESTION is not None
    return bytes(sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16)).rstrip(b"\0")


def plain_for_same_host(sock: Any) -> bytes | None:
    """Switch a TCP connection from this host to cubic or reno if it uses
    anything else; returns the algorithm set, or None if nothing changed
    (another host, not TCP, no socket, already plain, or not allowed here)."""
    if TCP_CONGESTION is None or sock is None:
        return None  # not Linux (the option means something else or nothing), or no socket
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    if not same_host(sock.getpeername()[0], sock.getsockname()[0]):
        return None
    if congestion(sock) in PLAIN:
        return None
    for name in PLAIN:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, name)
        except OSError:
            continue  # cubic may need privileges (net.ipv4.tcp_allowed_congestion_control)
        return name
    return None


def system_default() -> str:
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
