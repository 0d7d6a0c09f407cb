"""A starter recipe from a base checkpoint and corpus locations: what ``trecflow init`` writes.

`starter_recipe` reads the checkpoint's ``config.json`` and tokenizer (never its weights), lists
each corpus location (a folder, file or glob; a local path or any fsspec URL) and reads a small
sample of its first file, then returns the YAML text of a recipe that validates and runs as
written (it is validated before it is returned):

- ``model.params``: the parameters of the architecture ``config.json`` describes, built on
  PyTorch's meta device (no memory, no weights read; tied embeddings counted once);
- ``tokenizer.from_base`` and ``base.path``: the checkpoint; ``eos_token``: the tokenizer's
  end-of-text token (``tokenizer_config.json``, else ``config.json``'s ``eos_token_id``);
- ``corpus``: one source per location, named after it, its format from its files' extensions and
  its text field from the first file's columns; no ``base`` split (nothing reads it: the tokenizer
  and the weights come from the checkpoint);
- ``data.tokens``: one pass over the ``cpt`` split, estimated from the listing's bytes, the text
  bytes per stored byte of the sample (JSON, compression) and the tokenizer's bytes per token on it;
- ``corpus.partitions`` from the text's size (about 1 GB each, at least 2);
- the batch and ``seq_len`` from that budget and the model's context; the peak LR an assumption,
  the weight decay the one that puts tau at the Power-Lines optimum for the run's TPP;
- ``scoring``: the rules scorer alone, so the recipe runs as written, with quantile tiers; the
  quality classifier needs the user's judgement of which sources are high and low quality, so it
  is a commented block marked ``CHOOSE``. The ``classifier`` split is kept so that turning it on
  reuses the ingest.

Bad input raises `StarterError`, one line naming ``--base``, ``--corpus`` or ``--name``.
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from tasks.ingest import EXTENSIONS, IngestError, source_filesystem
from tasks.scoring.perplexity import WEIGHT_FILES
from trecflow.recipe import RecipeError, SourceSection, parse_recipe, read_yaml
from trecflow.settings import expand_path

PEAK_LR = 3.0e-4  # ASSUMPTION written into the recipe: a common continued-pretraining peak LR
HQ_FRACTION = 0.1
STARTER_SPLITS = {"eval": 0.05, "cpt": 0.9, "classifier": 0.05}
MAX_SEQ_LEN = 2048  # longer contexts are rarely worth their memory in CPT; the user can raise it
MIN_SEQ_LEN = 64
MIN_SEQUENCES = 8  # per step; a power of two, so it divides across the default 2 workers
MAX_BATCH_TOKENS = 2**20
TARGET_STEPS = 1000  # the batch shrinks (down to MIN_SEQUENCES) until the run has this many steps
MIN_STEPS = 20
MAX_REEVALUATED_STEPS = 1000
PARTITION_TEXT_BYTES = 10**9  # deduplication partitions hold about this much text each (at least 2)
SAMPLE_TEXT_BYTES = 256 * 1024  # text read from the first file of each source: enough for bytes per token
SAMPLE_DOCUMENTS = 1000
FILES_SHOWN = 3
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DISK_MARKERS = ("state.json", "dataset_info.json")  # what Dataset.save_to_disk writes beside its .arrow files


class StarterError(ValueError):
    """Input a starter recipe cannot be made from; one line naming the option."""


@dataclass(frozen=True)
class BaseCheckpoint:
    """What a starter recipe needs of a causal-LM checkpoint (read from config.json and tokenizer.json)."""

    location: str
    architecture: str
    params: int
    vocab_size: int
    tokenizer: Any  # tokenizers.Tokenizer
    eos_token: str
    eos_from: str
    context: int | None


@dataclass(frozen=True)
class CorpusSource:
    """One corpus location: its listing (files, bytes, a few names) and a sample of its first file."""

    location: str
    name: str
    format: str
    text_field: str
    files: int
    stored_bytes: int
    examples: tuple[str, ...]
    text_per_stored_byte: float
    bytes_per_token: float

    @property
    def tokens(self) -> int:
        """Estimated tokens of the whole source (before deduplication and filtering)."""
        return int(self.stored_bytes * self.text_per_stored_byte / self.bytes_per_token)


@dataclass(frozen=True)
class RunSize:
    """The run's shape: sequence length, sequences per step, steps."""

    seq_len: int
    sequences: int
    steps: int

    @property
    def batch_tokens(self) -> int:
        return self.seq_len * self.sequences

    @property
    def tokens(self) -> int:
        return self.batch_tokens * self.steps


def _recipe_path(location: str) -> str:
    """A location as the recipe names it: local paths absolute (the recipe may run elsewhere), URLs
    and ``${VAR}`` paths as given."""
    if "://" in location or "::" in location or "$" in location:
        return location.rstrip("/") if not location.endswith("://") else location
    return str(Path(location).expanduser().resolve())


def _causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {name for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in ([value] if isinstance(value, str) else value)}
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        return any(name in names or name.endswith("ForCausalLM") for name in architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def parameter_count(config) -> int:
    """Parameters of the causal LM ``config`` describes (a transformers config), built on the meta
    device: nothing allocated, no weights read; shared (tied) tensors counted once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def inspect_base(base: str, endpoint_url: str | None = None) -> BaseCheckpoint:
    """Read a causal-LM checkpoint folder (local or any fsspec URL): config.json, tokenizer.json,
    tokenizer_config.json and the listing. `StarterError` (naming --base) unless it is one."""
    from tokenizers import Tokenizer
    from transformers import AutoConfig

    from training.models import location_filesystem

    location = expand_path(base).rstrip("/")

    def refuse(problem: str) -> StarterError:
        return StarterError(f"--base: {location} {problem}".replace("\n", " "))

    try:
        fs, root = location_filesystem(location, endpoint_url)  # as the tokenizer and base stages open it
        if not fs.isdir(root):
            raise refuse("is not a folder (a Hugging Face checkpoint folder is expected)" if fs.exists(root) else "does not exist")
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)}
        if "config.json" not in names:
            raise refuse("has no config.json (not a Hugging Face checkpoint)")
        raw_config = fs.cat_file(f"{root}/config.json")
        raw_tokenizer = fs.cat_file(f"{root}/tokenizer.json") if "tokenizer.json" in names else None
        raw_tokenizer_config = fs.cat_file(f"{root}/tokenizer_config.json") if "tokenizer_config.json" in names else None
    except StarterError:
        raise
    except Exception as error:  # an unknown protocol, an unreachable store, missing credentials
        raise refuse(f"cannot be read: {type(error).__name__}: {error}") from None
    try:
        with tempfile.TemporaryDirectory() as local:  # AutoConfig reads a folder
            (Path(local) / "config.json").write_bytes(raw_config)
            config = AutoConfig.from_pretrained(local)
    except Exception as error:
        raise refuse(f"has a config.json that transformers cannot parse: {type(error).__name__}: {error}") from None
    architecture = "/".join(getattr(config, "architectures", None) or []) or config.model_type
    if not _causal_lm(config):
        raise refuse(f"is a {architecture}, not a causal LM")
    if not names & set(WEIGHT_FILES):
        raise refuse(f"has no weights ({' or '.join(WEIGHT_FILES[::2])}): not a checkpoint")
    if raw_tokenizer is None:
        raise refuse("has no tokenizer.json (tokenizer.from_base reads it)")
    tokenizer = Tokenizer.from_str(raw_tokenizer.decode())
    vocab_size = getattr(config, "vocab_size", None) or tokenizer.get_vocab_size()
    if tokenizer.get_vocab_size() > vocab_size:
        raise refuse(f"has a tokenizer of {tokenizer.get_vocab_size():,} tokens but config.json's vocab_size is {vocab_size:,}")
    eos_token, eos_from = _eos_token(tokenizer, config, raw_tokenizer_config)
    if eos_token is None:
        raise refuse("names no end-of-text token (tokenizer_config.json eos_token or config.json eos_token_id) in its tokenizer")
    try:
        params = parameter_count(config)
    except Exception as error:  # an architecture this transformers cannot build
        raise refuse(f"describes a {architecture} that transformers cannot build: {type(error).__name__}: {error}") from None
    context = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                    if isinstance(getattr(config, key, None), int)), None)
    return BaseCheckpoint(_recipe_path(base), architecture, params, vocab_size, tokenizer, eos_token, eos_from, context)


def _eos_token(tokenizer, config, raw_tokenizer_config: bytes | None) -> tuple[str | None, str]:
    """The end-of-text token and where it came from; only a token the tokenizer knows."""
    if raw_tokenizer_config is not None:
        try:
            declared = _token_text(json.loads(raw_tokenizer_config).get("eos_token"))
        except (json.JSONDecodeError, AttributeError):
            declared = None
        if declared is not None and tokenizer.token_to_id(declared) is not None:
            return declared, "tokenizer_config.json"
    eos_id = getattr(config, "eos_token_id", None)
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if isinstance(eos_id, int) and tokenizer.id_to_token(eos_id) is not None:
        return tokenizer.id_to_token(eos_id), "config.json eos_token_id"
    return None, ""


def _format_of(name: str) -> str | None:
    return next((kind for kind, endings in EXTENSIONS.items() if name.endswith(endings)), None)


@dataclass
class _Files:
    """Files of one format in a listing, aggregated as they are listed: count, bytes, the first
    names in sorted order (the whole listing is never held)."""

    count: int = 0
    size: int = 0
    first: tuple[str, ...] = ()

    def add(self, name: str, size: int) -> None:
        self.count += 1
        self.size += size
        if len(self.first) < FILES_SHOWN or name < self.first[-1]:
            self.first = tuple(sorted((*self.first, name))[:FILES_SHOWN])


def _listing(fs: fsspec.AbstractFileSystem, target: str) -> tuple[str, _Files]:
    """(format, its files) of a folder (walked one directory at a time), file or glob; files of no
    known format are skipped. A save_to_disk folder is format ``disk`` (its .arrow files)."""
    by_format: dict[str, _Files] = {}
    if "*" in target:
        for name, info in fs.glob(target, detail=True).items():
            if info.get("type") != "directory" and _format_of(name):
                by_format.setdefault(_format_of(name), _Files()).add(name, info.get("size") or 0)
    elif fs.isdir(target):
        disk = all(fs.exists(f"{target}/{marker}") for marker in DISK_MARKERS)
        for folder, _, files in fs.walk(target, detail=True):
            for name, info in files.items():
                if disk:
                    kind = "disk" if name.endswith(".arrow") else None
                else:
                    kind = _format_of(name)
                if kind:
                    by_format.setdefault(kind, _Files()).add(f"{folder.rstrip('/')}/{name}", info.get("size") or 0)
    elif fs.exists(target) and _format_of(target):
        by_format[_format_of(target)] = _Files()
        by_format[_format_of(target)].add(target, fs.size(target) or 0)
    if len(by_format) > 1:
        found = ", ".join(f"{kind} ({files.count} files)" for kind, files in sorted(by_format.items()))
        raise StarterError(f"holds files of several formats: {found}; give one folder or glob per format")
    if not by_format:
        return "", _Files()
    ((kind, files),) = by_format.items()
    return kind, files


def _choose_text_field(columns: dict[str, bool], where: str) -> str:
    """``text`` when it holds strings, else the first string column."""
    if columns.get("text"):
        return "text"
    for name, is_string in columns.items():
        if is_string:
            return name
    raise StarterError(f"{where} has no text column (columns: {', '.join(columns) or 'none'})")


def _sample_jsonl(fs, path: str) -> tuple[str, list[str], float]:
    """(text field, texts, text bytes per stored byte) of the start of a JSON-lines file, compressed
    or not (stored bytes are counted before decompression)."""
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    texts: list[str] = []
    field = None
    text_bytes = 0
    with fs.open(path, "rb") as raw:
        compression = infer_compression(path)
        stream = compr[compression](raw, mode="rb") if compression else raw
        lines = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")  # held: collecting it closes raw
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise StarterError(f"{path}: a line is not JSON (JSON lines expected)") from None
            if not isinstance(record, dict):
                continue
            if field is None:
                field = _choose_text_field({key: isinstance(value, str) for key, value in record.items()}, path)
            value = record.get(field)
            if isinstance(value, str):
                texts.append(value)
                text_bytes += len(value.encode("utf-8"))
            if text_bytes >= SAMPLE_TEXT_BYTES or len(texts) >= SAMPLE_DOCUMENTS:
                break
        consumed = raw.tell()
        lines.detach()
    if field is None:
        raise StarterError(f"{path} holds no JSON records")
    return field, texts, text_bytes / max(consumed, 1)


def _string_columns(schema) -> dict[str, bool]:
    import pyarrow as pa

    return {field.name: pa.types.is_string(field.type) or pa.types.is_large_string(field.type) for field in schema}


def _sample_parquet(fs, path: str) -> tuple[str, list[str], float]:
    """(text field, texts, text bytes per stored byte) from the footer and the first batch."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        field = _choose_text_field(_string_columns(parquet.schema_arrow), path)
        column = parquet.schema_arrow.get_field_index(field)
        metadata = parquet.metadata
        text_bytes = sum(metadata.row_group(group).column(column).total_uncompressed_size for group in range(metadata.num_row_groups))
        batch = next(parquet.iter_batches(batch_size=SAMPLE_DOCUMENTS, columns=[field]), None)
    texts = [text for text in (batch.column(0).to_pylist() if batch is not None else []) if isinstance(text, str)]
    return field, texts, text_bytes / max(fs.size(path), 1)


def _sample_arrow(fs, path: str) -> tuple[str, list[str], float]:
    """(text field, texts, 1.0) of an Arrow stream file (``datasets``' own format: uncompressed)."""
    import pyarrow as pa

    texts: list[str] = []
    with fs.open(path, "rb") as handle:
        reader = pa.ipc.open_stream(handle)
        field = _choose_text_field(_string_columns(reader.schema), path)
        for batch in reader:
            texts.extend(text for text in batch.column(field).to_pylist() if isinstance(text, str))
            if len(texts) >= SAMPLE_DOCUMENTS or sum(map(len, texts)) >= SAMPLE_TEXT_BYTES:
                break
    return field, texts[:SAMPLE_DOCUMENTS], 1.0


def inspect_corpus(location: str, name: str, tokenizer, endpoint_url: str | None = None) -> CorpusSource:
    """List one corpus location and sample its first file. `StarterError` naming --corpus when it
    holds no readable file of a known format."""
    expanded = expand_path(location)
    try:
        fs, target = source_filesystem(SourceSection(name=name, path=location), endpoint_url)  # as ingest lists it
        kind, files = _listing(fs, target.rstrip("/") if "*" not in target else target)
        if not files.count:
            raise StarterError(f"no {', '.join(EXTENSIONS)} files (nor a save_to_disk folder)")
        first = files.first[0]
        sampler = {"jsonl": _sample_jsonl, "parquet": _sample_parquet, "arrow": _sample_arrow, "disk": _sample_arrow}[kind]
        field, texts, text_per_stored_byte = sampler(fs, first)
    except StarterError as error:
        raise StarterError(f"--corpus: {expanded}: {error}") from None
    except IngestError as error:  # a protocol not installed or not known
        raise StarterError(f"--corpus: {error}") from None
    except Exception as error:  # an unknown protocol, missing credentials, an unreadable file
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise StarterError(f"--corpus: {expanded}: cannot be read: {type(error).__name__}: {message}") from None
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise StarterError(f"--corpus: {expanded}: {first} holds no text in {field!r}")
    tokens = sum(len(encoding.ids) for encoding in tokenizer.encode_batch(texts))
    bytes_per_token = sum(len(text.encode("utf-8")) for text in texts) / max(tokens, 1)
    return CorpusSource(
        location=_recipe_path(location),
        name=name,
        format=kind,
        text_field=field,
        files=files.count,
        stored_bytes=files.size,
        examples=tuple(path.rsplit("/", 1)[-1] for path in files.first),
        text_per_stored_byte=text_per_stored_byte,
        bytes_per_token=bytes_per_token,
    )


def source_names(locations: list[str]) -> list[str]:
    """A recipe source name per location: its last path component (without glob or extension),
    lowercased to ``[a-z0-9_-]``, made unique with ``-2``, ``-3``, ..."""
    names: list[str] = []
    for location in locations:
        parts = [part for part in re.split(r"[/:]", location) if part and "*" not in part]
        stem = parts[-1] if parts else "source"
        for endings in EXTENSIONS.values():
            for ending in sorted(endings, key=len, reverse=True):
                if stem.endswith(ending):
                    stem = stem[: -len(ending)]
                    break
        name = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_") or "source"
        unique, number = name, 2
        while unique in names:
            unique, number = f"{name}-{number}", number + 1
        names.append(unique)
    return names


def _power_of_two_at_most(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1.0)))))


def run_size(cpt_tokens: int, context: int | None) -> RunSize:
    """The sequence length (a power of two within the context, at most `MAX_SEQ_LEN`, shorter for
    a small corpus), sequences per step (a power of two from `MIN_SEQUENCES`, aiming at
    `TARGET_STEPS`, at most `MAX_BATCH_TOKENS`) and the steps one pass over ``cpt_tokens`` gives.
    `StarterError` below `MIN_STEPS`."""
    seq_len = _power_of_two_at_most(min(context or MAX_SEQ_LEN, MAX_SEQ_LEN))
    while seq_len > MIN_SEQ_LEN and cpt_tokens < MIN_STEPS * MIN_SEQUENCES * seq_len:
        seq_len //= 2
    most = max(MIN_SEQUENCES, MAX_BATCH_TOKENS // seq_len)
    sequences = min(max(_power_of_two_at_most(cpt_tokens / (TARGET_STEPS * seq_len)), MIN_SEQUENCES), most)
    steps = cpt_tokens // (sequences * seq_len)
    if steps < MIN_STEPS:
        raise StarterError(
            f"--corpus: about {cpt_tokens:,} tokens in the cpt split, fewer than {MIN_STEPS} steps of {sequences} sequences "
            f"of {seq_len} tokens: give more data"
        )
    return RunSize(seq_len, sequences, steps)


def weight_decay_at_optimum(params: int, size: RunSize, peak_lr: float = PEAK_LR) -> tuple[float, float, float]:
    """(weight decay, tau, TPP): the decay that puts tau = 1/(peak_lr * lambda * T) at Power Lines'
    optimum for TPP = D/N, with tau kept >= 2/T so that peak_lr * lambda stays below 1/2."""
    from training.trec import tau_opt

    tpp = size.tokens / params
    tau = max(tau_opt(tpp), 2.0 / size.steps)
    return 1.0 / (peak_lr * size.steps * tau), tau, tpp


def _quoted(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size / 1e3:,.1f} kB"


def starter_recipe(base: str, corpus: list[str], name: str, endpoint_url: str | None = None) -> str:
    """The YAML text of a starter recipe for continuing ``base`` on the ``corpus`` locations (one
    source each), validated before it is returned. `StarterError` on bad input."""
    if not NAME_PATTERN.match(name):
        raise StarterError(f"--name: {name!r} must start with a letter or digit and hold only letters, digits, '.', '_' or '-'")
    if not corpus:
        raise StarterError("--corpus: give at least one corpus folder, file or glob")
    checkpoint = inspect_base(base, endpoint_url)
    sources = [
        inspect_corpus(location, source_name, checkpoint.tokenizer, endpoint_url)
        for location, source_name in zip(corpus, source_names(corpus))
    ]
    total = sum(source.tokens for source in sources)
    size = run_size(int(total * STARTER_SPLITS["cpt"]), checkpoint.context)
    text = render(name, checkpoint, sources, size)
    try:
        parse_recipe(read_yaml(text), source=f"starter recipe {name}")
    except RecipeError as error:  # a bug here, not the user's input: say so plainly
        raise RuntimeError(f"trecflow init wrote a recipe that does not validate: {error}") from None
    return text


def render(name: str, checkpoint: BaseCheckpoint, sources: list[CorpusSource], size: RunSize) -> str:
    """The recipe's YAML text, with comments saying where each value comes from."""
    weight_decay, tau, tpp = weight_decay_at_optimum(checkpoint.params, size)
    total = sum(source.tokens for source in sources)
    every = max(1, math.ceil(size.steps / MAX_REEVALUATED_STEPS))
    context = f"{checkpoint.context:,}" if checkpoint.context else "unknown"
    lines = [
        f"# Starter recipe written by `trecflow init` for {checkpoint.location}.",
        "# Check the values marked ASSUMPTION and CHOOSE, then run `trecflow validate`, `trecflow predict`",
        "# and `trecflow score` on this file.",
        f"name: {name}",
        "",
        f"# The base: {checkpoint.architecture}, {checkpoint.params:,} parameters (from config.json), vocabulary",
        f"# {checkpoint.vocab_size:,} (its tokenizer: {checkpoint.tokenizer.get_vocab_size():,} tokens), context {context} tokens.",
        "model:",
        f"  params: {checkpoint.params}",
        f"# D: one pass over the cpt split ({STARTER_SPLITS['cpt']:.0%} of the corpus), estimated at {total:,} tokens for the",
        "# whole corpus from its listing (below) before deduplication and the language filter;",
        "# `trecflow score` prints what remains.",
        "data:",
        f"  tokens: {size.tokens}   # {size.steps:,} steps",
        f"  seq_len: {size.seq_len}   # within the model's context ({context})",
        "batch:",
        f"  tokens: {size.batch_tokens}   # {size.sequences} sequences of {size.seq_len} tokens",
        "optimizer:",
        f"  peak_lr: {PEAK_LR:g}   # ASSUMPTION: a common continued-pretraining peak LR; sweep it",
        f"  weight_decay: {weight_decay:.4g}   # tau = 1/(peak_lr*lambda*T) = {tau:.4g}: the Power-Lines optimum at TPP {tpp:.4g}",
        "  betas: [0.9, 0.95]",
        "schedule:",
        "  kind: linear   # re-warm over 1% of the steps, then decay linearly to zero",
        "  warmup: 0.01",
        "  final_lr_ratio: 0.0",
        "curriculum:",
        f"  hq_fraction: {HQ_FRACTION}   # ASSUMPTION: the share of sequences that are high quality",
        "  variants:",
        "    uniform: {strategy: uniform}",
        "    end: {strategy: end}",
        "    trec_valley: {strategy: trec_valley}",
        "",
        "corpus:",
        "  sources:",
    ]
    for source in sources:
        shown = ", ".join(source.examples) + (", ..." if source.files > len(source.examples) else "")
        lines += [
            f"    # {source.files:,} {source.format} file{'s' if source.files != 1 else ''}, {_megabytes(source.stored_bytes)}: {shown}",
            f"    # about {source.tokens:,} tokens ({source.bytes_per_token:.2f} bytes of text per token on a sample of the first file)",
            f"    - {{name: {source.name}, path: {_quoted(source.location)}, format: {source.format}, text_field: {_quoted(source.text_field)}}}",
        ]
    splits = ", ".join(f"{split}: {share:g}" for split, share in STARTER_SPLITS.items())
    text_bytes = sum(source.stored_bytes * source.text_per_stored_byte for source in sources)
    partitions = min(65536, max(2, _power_of_two_at_most(2 * text_bytes / PARTITION_TEXT_BYTES)))
    lines += [
        "  # No base split: the tokenizer and the weights come from the checkpoint. The classifier split is",
        "  # read once the classifier scorer is on (below); keeping it now lets that reuse this ingest.",
        f"  splits: {{{splits}}}",
        f"  partitions: {partitions}   # deduplication partitions: about {PARTITION_TEXT_BYTES / 1e9:g} GB of text each",
        "scoring:",
        f"  tiers: {{method: quantiles, hq: {HQ_FRACTION}, lq: 0.3}}   # shares of the scored documents, whatever the score scale",
        "  # Rules alone run as written but pass most clean text (their score has few distinct values, so",
        "  # most documents may land in hq): the curriculum means something once the classifier scores quality.",
        "  scorers: [rules]",
        "  weights: {rules: 1.0}",
        *_classifier_choice(sources),
        "",
        "tokenizer:",
        f"  from_base: {_quoted(checkpoint.location)}",
        f"  eos_token: {_quoted(checkpoint.eos_token)}   # separates packed documents (from {checkpoint.eos_from})",
        "base:",
        f"  path: {_quoted(checkpoint.location)}",
        "# 2 CPU workers in fp32. On GPUs: use_gpu: true, precision: bf16, workers: one per GPU (size the job",
        "# with `trecflow plan` on this file and --gpus N).",
        "training:",
        "  workers: 2",
        "reevaluation:",
        f"  every: {every}   # re-evaluate every k-th step's batch: at most {MAX_REEVALUATED_STEPS:,} batches",
        "",
    ]
    return "\n".join(lines)


def _classifier_choice(sources: list[CorpusSource]) -> list[str]:
    """The commented classifier block: which sources are high and low quality is the user's call."""
    names = [source.name for source in sources]
    if len(names) < 2:
        return [
            "  # CHOOSE: the quality classifier learns from sources you trust (hq) against sources you do",
            "  # not (lq): with a second --corpus source it can be turned on here (scoring.classifier).",
        ]
    return [
        "  # CHOOSE: the quality classifier learns from the sources you trust (hq) against those you do not",
        f"  # (lq); sources: {', '.join(names)}. To use it, replace the two lines above with these, each source",
        "  # in at most one list:",
        "  # scorers: [rules, classifier]",
        "  # weights: {rules: 0.3, classifier: 0.7}",
        "  # classifier:",
        f"  #   hq_sources: [{names[0]}]",
        f"  #   lq_sources: [{names[-1]}]",
    ]
