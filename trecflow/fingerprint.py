"""Content fingerprints of stage outputs.

A stage's fingerprint hashes its name, its version, its configuration and the fingerprints of
its inputs, as canonical JSON. Equal fingerprints mean the same output, so a stage reuses an
output whose fingerprint matches and Prefect uses it as the cache key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FINGERPRINT_LENGTH = 16


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, floats in repr form."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint(stage: str, version: int, config: Any, inputs: dict[str, str] | None = None) -> str:
    """Hex fingerprint of one stage's output (first FINGERPRINT_LENGTH hex digits of SHA-256)."""
    payload = canonical_json({"stage": stage, "version": version, "config": config, "inputs": inputs or {}})
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_LENGTH]
