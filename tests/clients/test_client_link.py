"""How the SDK's link words a failed connection (bento_clients/link.py), on
exceptions shaped as trio and ssl raise them: the cause may sit in an
exception group, or behind ``__cause__`` / ``__context__``."""

from __future__ import annotations

import ssl

import trio
from bento_clients.link import describe, permanent


def ssl_error(cls: type[ssl.SSLError], reason: str, verify: str | None = None) -> ssl.SSLError:
    err = cls(1, f"[SSL: {reason}] ...")
    err.reason = reason
    if verify is not None:
        err.verify_message = verify  # type: ignore[attr-defined]
    return err


def wrapped(cause: BaseException) -> BaseException:
    """As trio reports it: a BrokenResourceError caused by ``cause``, in a group."""
    broken = trio.BrokenResourceError()
    broken.__cause__ = cause
    return ExceptionGroup("from a nursery", [broken])


def test_refused_inside_a_group_behind_an_oserror():
    refused = ConnectionRefusedError(111, "Connection refused")
    outer = OSError("all attempts to connect to 127.0.0.1:9 failed")
    outer.__cause__ = ExceptionGroup("all attempts failed", [refused])
    text = describe(outer, "ws://127.0.0.1:9/v1")
    assert text == "connection refused — is a server running at ws://127.0.0.1:9/v1? start one with `make run`"
    assert not permanent(outer)  # a server may be starting: retried


def test_tls_failures_are_named_and_not_retried():
    untrusted = wrapped(ssl_error(ssl.SSLCertVerificationError, "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"))
    assert describe(untrusted) == (
        "TLS: certificate verify failed: self-signed certificate (use --ca-file or BENTO_CA_FILE)")
    plain = wrapped(ssl_error(ssl.SSLError, "WRONG_VERSION_NUMBER"))
    assert describe(plain) == "this is not a TLS server: use ws://"
    assert permanent(untrusted) and permanent(plain)
    other = wrapped(ssl_error(ssl.SSLError, "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"))
    assert not permanent(other)


def test_other_errors_keep_their_own_words():
    assert describe(OSError(104, "Connection reset by peer")) == "Connection reset by peer"
    assert describe(trio.BrokenResourceError()) == "BrokenResourceError"
    assert describe("as given") == "as given"
    looped = OSError("a")
    looped.__context__ = looped  # a cycle ends the walk
    assert describe(looped) == "a"
