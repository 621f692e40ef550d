"""Secret hashing for accounts: passwords and PINs are stored as salted scrypt hashes.

Used by the fixture loader and by customer management (engine.admin); one format for both.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

__all__ = ["SCRYPT_N", "hash_secret", "verify_secret"]

SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_secret(secret: str, *, n: int = SCRYPT_N) -> str:
    """A salted scrypt hash: ``scrypt$N$r$p$<salt>$<hash>`` (base64).

    `n` (a power of two) is the work factor; verify_secret reads it back from the hash.
    """
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_secret(secret: str, stored: str | None) -> bool:
    """Whether `secret` matches a hash made by hash_secret (False for anything else)."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)
