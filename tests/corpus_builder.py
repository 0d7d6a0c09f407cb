"""A small real-text corpus that needs no download, for the tests and benchmarks.

- ``stdlib-docs`` (high quality): docstrings of Python's standard library (edited English prose);
- ``debian-copyright`` (low quality): this machine's ``/usr/share/doc/*/copyright`` boilerplate.
"""

from __future__ import annotations

import glob
import importlib
import json
import warnings
from pathlib import Path

MODULES = (
    "argparse asyncio base64 bisect calendar collections concurrent.futures configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fractions ftplib functools getopt gettext glob gzip hashlib "
    "heapq hmac html http.client http.server imaplib inspect io ipaddress itertools json logging mailbox "
    "mimetypes multiprocessing numbers operator optparse os pathlib pickle pdb platform plistlib poplib pprint "
    "queue random re sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 "
    "ssl statistics string struct subprocess tarfile tempfile textwrap threading timeit tkinter tokenize "
    "trace traceback typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom xml.etree.ElementTree "
    "zipfile zoneinfo"
).split()


def stdlib_docstrings(min_words: int = 40) -> list[str]:
    """Distinct docstrings of at least ``min_words`` words, in a stable order."""
    texts: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for attribute in [module, *(getattr(module, key, None) for key in dir(module))]:
                doc = getattr(attribute, "__doc__", None)
                if isinstance(doc, str) and len(doc.split()) >= min_words:
                    texts.add(doc.strip())
    return sorted(texts)


def debian_copyright(limit: int = 400) -> list[str]:
    texts = []
    for path in sorted(glob.glob("/usr/share/doc/*/copyright"))[:limit]:
        texts.append(Path(path).read_text(errors="replace"))
    return texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def build_test_corpus(folder: Path) -> dict[str, Path]:
    """Write both sources as jsonl into ``folder``; returns {source: path}."""
    return {
        "stdlib-docs": write_jsonl(folder / "stdlib-docs.jsonl", stdlib_docstrings()),
        "debian-copyright": write_jsonl(folder / "debian-copyright.jsonl", debian_copyright()),
    }
