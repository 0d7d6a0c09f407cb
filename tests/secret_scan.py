"""The project's one scanner for credentials where they do not belong.

Tests plant the recognizable fake credentials of `PLANTED` (AWS keys, an MLflow token, store
options, a password inside a URL) in the environment and in a recipe, run something, then pass
`scan` every place the run wrote to: folders (an MLflow SQLite database and its artifacts, Prefect's
database and result storage, a store, Ray's session logs) and texts (a command's output, values
read back through an API). A hit is a planted value found verbatim, percent-encoded or base64
encoded; every byte of every file is read, databases included (SQLite keeps text as UTF-8, in the
database or its write-ahead log).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import quote

PASSWORD = "FAKEPASS7qx2m9"  # inside URLs: scheme://fakeuser:FAKEPASS7qx2m9@host
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKE7QX2M9TRCKEY",
    "AWS_SECRET_ACCESS_KEY": "fakeSecret7qx2m9/TRCaccessKEYvalue0000",
    "AWS_SESSION_TOKEN": "fakeSessionToken7qx2m9TRC",
    "MLFLOW_TRACKING_TOKEN": "fakeMlflowToken7qx2m9",
    "MLFLOW_TRACKING_PASSWORD": "fakeMlflowPassword7qx2m9",
    "store option secret": "fakeStoreOptionSecret7qx2m9",
    "recipe storage option": "fakeRecipeOptionSecret7qx2m9",
    "URL password": PASSWORD,
}


def planted_env() -> dict[str, str]:
    """The environment variables that carry planted credentials (moto's S3 server accepts any
    keys; ``TRECFLOW_STORE_OPTIONS`` gives s3fs a key and secret of its own)."""
    env = {name: value for name, value in PLANTED.items() if name.isupper()}
    env["TRECFLOW_STORE_OPTIONS"] = json.dumps({"key": PLANTED["AWS_ACCESS_KEY_ID"], "secret": PLANTED["store option secret"]})
    return env


def url_with_password(url: str, user: str = "fakeuser") -> str:
    """``url`` (``http://host:port/...``) with user information holding the planted password."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{PASSWORD}@{rest}"


def _forms(value: str) -> set[bytes]:
    """The value as bytes, percent-encoded, and base64-encoded at each of the three alignments a
    longer encoded text can give it (the groups it shares with its neighbours left out)."""
    raw = value.encode()
    encoded = {base64.b64encode(b"\0" * shift + raw)[4 if shift else 0 : -4] for shift in range(3)}
    return {raw, quote(value, safe="").encode(), *encoded}


@dataclass(frozen=True)
class Hit:
    """A planted credential (``name``) found in ``where`` (a file or a named text)."""

    name: str
    where: str


@dataclass
class Scan:
    """What one `scan` read and found."""

    files: int
    bytes: int
    texts: int
    hits: list[Hit]


def scan(folders: Iterable[Path] = (), texts: Mapping[str, str | bytes] | None = None,
         planted: Mapping[str, str] = PLANTED) -> Scan:
    """Every file under ``folders`` (recursively) and every text of ``texts`` searched for each
    planted value in each of its forms."""
    forms = {name: _forms(value) for name, value in planted.items()}
    hits: list[Hit] = []
    files = size = 0

    def search(data: bytes, where: str) -> None:
        for name, encoded in forms.items():
            if any(form in data for form in encoded):
                hits.append(Hit(name, where))

    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = Path(root) / name
                if path.is_symlink() or not path.is_file():
                    continue
                data = path.read_bytes()
                files += 1
                size += len(data)
                search(data, str(path))
    for where, text in (texts or {}).items():
        search(text.encode() if isinstance(text, str) else text, where)
    return Scan(files, size, len(texts or {}), hits)
