"""The session seed every random test derives its own from (see conftest.py)."""

from __future__ import annotations

import os
import secrets
import zlib

# Fresh in every session; JETFAST_TEST_SEED=S replays the session that printed S.
SESSION_SEED = int(os.environ.get("JETFAST_TEST_SEED") or secrets.randbelow(2**31))


def seed_of(name: str) -> int:
    """The seed of a test or module (by its pytest node id): a function of the session seed and the name only."""
    return (SESSION_SEED * 1_000_003 + zlib.crc32(name.encode())) % 2**31
