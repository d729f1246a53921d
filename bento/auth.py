"""Capabilities: session tokens, API keys, and the rate limit on failed guesses.

Tokens are bearer secrets with 256 bits of randomness. The server keeps only
their SHA-256 hashes; a presented token is hashed and the hash looked up, so
what the look-up compares is a hash the caller cannot steer toward a stored
one (timing reveals nothing about a token). API keys are compared with
hmac.compare_digest. Tokens for an execute with an idempotency key are derived as an
HMAC of the server's secret over the key, so a retry gets the same tokens
without any clear token being stored. Nothing here may log or write a token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

OWNER_PREFIX = "bto_"
VIEWER_PREFIX = "btv_"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def new_tokens() -> tuple[str, str]:
    return OWNER_PREFIX + _b64(secrets.token_bytes(32)), VIEWER_PREFIX + _b64(secrets.token_bytes(32))


def derived_tokens(secret: bytes, idem_hash: str) -> tuple[str, str]:
    """The tokens of the session created under an idempotency key (same every time)."""
    owner = hmac.new(secret, b"owner\0" + idem_hash.encode(), hashlib.sha256).digest()
    viewer = hmac.new(secret, b"viewer\0" + idem_hash.encode(), hashlib.sha256).digest()
    return OWNER_PREFIX + _b64(owner), VIEWER_PREFIX + _b64(viewer)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def key_hash(api_key: str | None) -> str:
    """Who started a session: a hash of the API key ('' without one)."""
    if api_key is None:
        return ""
    return hashlib.sha256(b"bento-api-key\0" + api_key.encode("utf-8", "surrogatepass")).hexdigest()


def idem_hash(api_key_hash: str, key: str) -> str:
    return hashlib.sha256(f"{api_key_hash}\0{key}".encode("utf-8", "surrogatepass")).hexdigest()


def new_session_id() -> str:
    return "s_" + secrets.token_hex(12)


ROLES = ("admin", "user")


@dataclass(frozen=True)
class Key:
    """An API key the server accepts, by its hash (the key itself is never kept)."""

    name: str
    role: str  # one of ROLES
    hash: str  # key_hash() of the key

    @classmethod
    def plain(cls, api_key: str) -> Key:
        """A key given without a name (--api-key, --api-key-file): a user, named by its hash."""
        h = key_hash(api_key)
        return cls(name="key-" + h[:8], role="user", hash=h)


class ApiKeys:
    """The server's API keys, with their names and roles; empty means none are
    required. ``replace`` swaps the whole set at once (a reload on SIGHUP): a
    connection or session whose key is gone stops being served."""

    def __init__(self, keys: list[Key] | None = None) -> None:
        self._by_hash: dict[str, Key] = {}
        self.replace(keys or [])

    def replace(self, keys: list[Key]) -> None:
        self._by_hash = {k.hash: k for k in keys}

    @property
    def required(self) -> bool:
        return bool(self._by_hash)

    def check(self, presented: str | None) -> str | None:
        """The key's hash if it is one of ours (or '' when none are required), else None."""
        if not self._by_hash:
            return key_hash(presented) if presented else ""
        if presented is None:
            return None
        h = key_hash(presented)
        found = False
        for known in self._by_hash:
            found |= hmac.compare_digest(h, known)
        return h if found else None

    def known(self, h: str) -> bool:
        """Whether a key hash accepted earlier is still accepted (not revoked since)."""
        return not self._by_hash or h in self._by_hash

    def name(self, h: str) -> str:
        """The name an operator gave the key ('' for no key or an unknown one)."""
        k = self._by_hash.get(h)
        return k.name if k is not None else ""

    def is_admin(self, h: str | None) -> bool:
        k = self._by_hash.get(h or "")
        return k is not None and k.role == "admin"


class GuessLimiter:
    """A token bucket per peer for failed token and key checks."""

    def __init__(self, burst: int = 20, per_second: float = 2.0, max_peers: int = 10_000) -> None:
        self.burst = burst
        self.rate = per_second
        self.max_peers = max_peers
        self._buckets: dict[str, tuple[float, float]] = {}

    def allowed(self, peer: str) -> bool:
        level, _ = self._level(peer)
        return level >= 1.0

    def failed(self, peer: str) -> None:
        level, now = self._level(peer)
        if len(self._buckets) >= self.max_peers and peer not in self._buckets:
            self._buckets.clear()
        self._buckets[peer] = (max(0.0, level - 1.0), now)

    def _level(self, peer: str) -> tuple[float, float]:
        now = time.monotonic()
        level, at = self._buckets.get(peer, (float(self.burst), now))
        return min(float(self.burst), level + (now - at) * self.rate), now

