"""Congestion control for same-host connections (bento/tcptune.py)."""

from __future__ import annotations

import socket

import pytest

from bento import tcptune


@pytest.mark.parametrize("peer, local, expected", [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.5.6.7", "127.0.0.1", True),
    ("::1", "::1", True),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
    ("10.1.2.3", "10.1.2.3", True),  # this host's own address
    ("10.1.2.4", "10.1.2.3", False),
    ("::ffff:10.1.2.4", "::ffff:10.1.2.3", False),
    ("fe80::1%eth0", "fe80::2%eth0", False),
    ("not an address", "127.0.0.1", False),
])
def test_same_host(peer, local, expected):
    assert tcptune.same_host(peer, local) is expected


def test_a_loopback_connection_is_made_plain():
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        with socket.create_connection(lsock.getsockname()):
            server, _ = lsock.accept()
            with server:
                before = tcptune.congestion(server)
                chosen = tcptune.plain_for_same_host(server)
                after = tcptune.congestion(server)
    if before in tcptune.PLAIN:
        assert chosen is None and after == before
    else:
        assert chosen in tcptune.PLAIN and after == chosen, (before, chosen, after)


def test_other_sockets_are_left_alone():
    a, b = socket.socketpair()
    with a, b:
        assert tcptune.plain_for_same_host(a) is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        assert tcptune.plain_for_same_host(u) is None
