"""Near-duplicate detection for ingest: MinHash signatures of word shingles, LSH banding, and
clustering of confirmed pairs. Pure functions on numpy arrays; `tasks.ingest` does the I/O.

1. `word_hashes` / `shingle_hashes`: text lowercased, punctuation stripped and whitespace collapsed
   (`normalize`), split into words; each word hashed with CRC-32 and every ``shingle`` consecutive
   word hashes combined into one uint64 (a polynomial over the words, then a 64-bit finalizer).
   Nothing uses Python's ``hash()``: every value is the same in every process and on every machine.
   A document of fewer than ``shingle`` words is one shingle; one without any word has none.
2. `signature`: a ``bands * rows`` permutation MinHash (``datasketch``, scheme ``affine64``) of the
   shingle hashes, fed in chunks of `CHUNK_SHINGLES`: memory per document is bounded by the chunk
   and the text window (`TEXT_WINDOW_CHARS`), never by the document's length.
3. `band_keys` / `sketches`: per band, a uint64 key of its ``rows`` hash values (two documents
   share a key in some band: a candidate pair); per document, the low byte of each hash value, a
   ``num_perm``-byte sketch from which `estimated_jaccard` estimates the similarity of a pair.
4. `bucket_edges`: in each (band, key) bucket, the member first by keep-priority (source rank,
   then doc_id) is the representative; each other member whose estimated Jaccard with it reaches
   the threshold gives an edge (member, representative).
5. `removed_documents`: the connected components of all edges; in each, the member first by
   keep-priority is kept and the others are removed. Edges, and so the result, do not depend on
   how documents are partitioned or in which order tasks run.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable, Iterator

import numpy as np

CHUNK_SHINGLES = 4096  # shingle hashes per MinHash update: a (CHUNK_SHINGLES x num_perm) matrix at most
TEXT_WINDOW_CHARS = 1 << 20  # text normalized and split at a time (cut at whitespace)
_PUNCTUATION = re.compile(r"[^\w\s]+")
# The same normalization on ASCII text, in bytes: delete what is neither a word character nor
# whitespace (for ``re``), and map the ASCII whitespace that str.split knows and bytes.split does
# not (\x1c-\x1f) to a space.
_ASCII_DELETE = bytes(code for code in range(128) if not re.match(r"[\w\s]", chr(code)))
_ASCII_SPACES = bytes.maketrans(bytes(range(0x1C, 0x20)), b" " * 4)
_NON_ASCII_RUN = re.compile(rb"[\x80-\xff]+")
_UNICODE_WHITESPACE = re.compile(r"\s+")
_LAST_WHITESPACE = re.compile(r"\s\S*\Z")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd: combining word hashes is a bijection in the last word


def normalize(text: str) -> str:
    """Lowercase, punctuation (neither a word character nor whitespace) removed, whitespace runs
    as one space, no leading or trailing space."""
    return " ".join(_PUNCTUATION.sub("", text.lower()).split())


def fmix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, element-wise on uint64 (a bijection that mixes every bit)."""
    values = np.asarray(values, dtype=np.uint64)
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xFF51AFD7ED558CCD)
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xC4CEB9FE1A85EC53)
    return values ^ (values >> np.uint64(33))


def _windows(text: str) -> Iterator[str]:
    """``text`` in consecutive pieces of about `TEXT_WINDOW_CHARS`, each cut after whitespace (no
    word is split unless a window's last 4096 characters hold no whitespace)."""
    start = 0
    while start < len(text):
        end = min(start + TEXT_WINDOW_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            if cut < end - 4096:  # no ASCII space or newline near the end: any whitespace there
                tail = max(start, end - 4096)
                last = _LAST_WHITESPACE.search(text, tail, end)
                cut = last.start() if last is not None else cut
            end = cut + 1 if cut >= start else end
        yield text[start:end]
        start = end


def _clean_non_ascii(match: re.Match) -> bytes:
    run = _PUNCTUATION.sub("", match.group().decode("utf-8"))
    return _UNICODE_WHITESPACE.sub(" ", run).encode("utf-8")


def normalized_words(text: str) -> list[bytes]:
    """``normalize(text).split()`` as UTF-8 bytes, faster: ASCII punctuation is deleted with
    bytes.translate, and only runs of non-ASCII characters go through the Unicode rules (a UTF-8
    sequence never holds an ASCII byte, so such a run is whole characters)."""
    data = text.lower().encode("utf-8").translate(_ASCII_SPACES, _ASCII_DELETE)
    if not data.isascii():
        data = _NON_ASCII_RUN.sub(_clean_non_ascii, data)
    return data.split()


def word_hashes(text: str) -> Iterator[np.ndarray]:
    """CRC-32 of each normalized word (as uint64), window by window: the words of
    ``normalize(text).split()`` in order (`TEXT_WINDOW_CHARS` of text at a time)."""
    for window in _windows(text):
        words = normalized_words(window)
        if words:
            yield np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))


def combine(words: np.ndarray, shingle: int) -> np.ndarray:
    """One uint64 per run of ``shingle`` consecutive word hashes (``len(words) - shingle + 1`` of
    them; empty when fewer words): order-sensitive, then mixed by `fmix64`."""
    count = len(words) - shingle + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    combined = words[:count] + np.uint64(1)
    for offset in range(1, shingle):
        combined = combined * _POLY + words[offset : offset + count] + np.uint64(1)
    return fmix64(combined)


def shingle_hashes(text: str, shingle: int) -> Iterator[np.ndarray]:
    """The hashes of the document's ``shingle``-word shingles, in text order, in arrays of at most
    about one text window; a document of fewer words yields one shingle of all its words, a
    document without words yields nothing."""
    carry = np.empty(0, dtype=np.uint64)
    produced = False
    for words in word_hashes(text):
        words = np.concatenate([carry, words]) if carry.size else words
        hashes = combine(words, shingle)
        if hashes.size:
            produced = True
            yield hashes
        carry = words[-(shingle - 1) :] if shingle > 1 else np.empty(0, dtype=np.uint64)
    if not produced and carry.size:
        yield combine(carry, carry.size)


def _identity(value):
    return value


class Signer:
    """MinHash signatures with ``num_perm = bands * rows`` permutations of seed ``seed`` (the
    permutations are drawn once per signer, the same in every process)."""

    def __init__(self, num_perm: int, seed: int, shingle: int):
        from datasketch import MinHash

        self._minhash = MinHash
        self.num_perm, self.seed, self.shingle = num_perm, seed, shingle
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, scheme="affine64")

    def signature(self, text: str) -> np.ndarray | None:
        """The document's MinHash hash values (uint64, ``num_perm``), or None when it has no word.
        Shingles are fed `CHUNK_SHINGLES` at a time."""
        minhash = self._minhash(
            num_perm=self.num_perm, seed=self.seed, hashfunc=_identity, scheme="affine64", permutations=self._template.permutations
        )
        empty = True
        for hashes in shingle_hashes(text, self.shingle):
            empty = False
            for start in range(0, hashes.size, CHUNK_SHINGLES):
                minhash.update_batch(hashes[start : start + CHUNK_SHINGLES].tolist())
        return None if empty else np.asarray(minhash.hashvalues, dtype=np.uint64)

    def signatures(self, texts: Iterable[str], count: int) -> tuple[np.ndarray, np.ndarray]:
        """Signatures of ``count`` texts (an iterable: they need not all be in memory) as a
        (count, num_perm) uint64 matrix, and a boolean mask of the documents that have words
        (the rows of the others are zeros)."""
        matrix = np.zeros((count, self.num_perm), dtype=np.uint64)
        has_words = np.zeros(count, dtype=bool)
        for index, text in enumerate(texts):
            values = self.signature(text)
            if values is not None:
                matrix[index], has_words[index] = values, True
        return matrix, has_words


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """A (documents, bands) uint64 matrix: band ``b``'s key hashes ``b`` and the band's ``rows``
    hash values, so equal keys mean (but for 64-bit collisions) equal bands."""
    signatures = np.asarray(signatures, dtype=np.uint64).reshape(len(signatures), bands, rows)
    keys = np.empty((len(signatures), bands), dtype=np.uint64)
    for band in range(bands):
        key = np.full(len(signatures), fmix64(np.array([band + 1], dtype=np.uint64))[0], dtype=np.uint64)
        for row in range(rows):
            key = fmix64(key * _POLY + signatures[:, band, row])
        keys[:, band] = key
    return keys


def sketches(signatures: np.ndarray) -> np.ndarray:
    """The low byte of every hash value: a (documents, num_perm) uint8 matrix."""
    return (np.asarray(signatures, dtype=np.uint64) & np.uint64(0xFF)).astype(np.uint8)


def estimated_jaccard(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of sketches (row-wise on matrices): equal bytes happen by
    chance with probability 1/256, so (share equal - 1/256) / (1 - 1/256), clipped to [0, 1]."""
    share = np.mean(np.asarray(left) == np.asarray(right), axis=-1)
    return np.clip((share - 1 / 256) / (1 - 1 / 256), 0.0, 1.0)


def bucket_edges(
    band: np.ndarray, key: np.ndarray, rank: np.ndarray, doc_id: np.ndarray, sketch: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Edges of the band rows given as parallel arrays: (member, representative) row indices, one
    per member of a (band, key) bucket other than its representative (the member first by
    (rank, doc_id)) whose estimated Jaccard with the representative is at least ``threshold``."""
    if len(band) < 2:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    order = np.lexsort((np.asarray(doc_id), np.asarray(rank), np.asarray(key), np.asarray(band)))
    sorted_band, sorted_key = np.asarray(band)[order], np.asarray(key)[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (sorted_band[1:] != sorted_band[:-1]) | (sorted_key[1:] != sorted_key[:-1])
    representative = np.flatnonzero(first)[np.cumsum(first) - 1]  # sorted position of each row's representative
    members = np.flatnonzero(~first)
    if members.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    member_rows, representative_rows = order[members], order[representative[members]]
    similar = estimated_jaccard(sketch[member_rows], sketch[representative_rows]) >= threshold
    return member_rows[similar], representative_rows[similar]


def removed_documents(
    left: np.ndarray, left_rank: np.ndarray, right: np.ndarray, right_rank: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The documents to remove given edges (left[i], right[i]) between doc_ids with their source
    ranks: of each connected component the member first by (rank, doc_id) is kept, every other
    member is returned (doc_ids and ranks, sorted by doc_id). Transitive: a chain of edges is one
    component. Memory grows with the number of edges only."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    left, right = np.asarray(left), np.asarray(right)
    if left.size == 0:
        return left[:0], np.empty(0, dtype=np.int64)
    nodes, index = np.unique(np.concatenate([left, right]), return_inverse=True)
    ranks = np.empty(len(nodes), dtype=np.int64)
    ranks[index] = np.concatenate([left_rank, right_rank])
    edges = len(left)
    graph = coo_matrix((np.ones(edges, dtype=np.int8), (index[:edges], index[edges:])), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    order = np.lexsort((np.arange(len(nodes)), ranks, labels))  # nodes are sorted by doc_id already
    removed = np.zeros(len(nodes), dtype=bool)
    sorted_labels = labels[order]
    removed[order[1:]] = sorted_labels[1:] == sorted_labels[:-1]  # not first of its component
    return nodes[removed], ranks[removed]
