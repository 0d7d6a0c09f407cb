"""What a user puts in their bucket before the paper recipe can run, in miniature: the corpus under
``corpus/web/*.parquet`` and ``corpus/curated/*.jsonl.gz``, and a base checkpoint (a tiny Llama
with its own byte-level BPE) under ``models/base-3.9b`` — the paths of configs/cpt-3.9b-900b.yaml
with ``TRECFLOW_BUCKET`` set to the test bucket. Real text (tests/corpus_builder.py), no download.
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

BASE_PREFIX = "models/base-3.9b"


def seed_bucket(bucket: str, endpoint: str, credentials: dict[str, str]) -> dict[str, int]:
    """Write the corpus and the base checkpoint to ``s3://bucket``; returns what was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tasks.tokenizer import hf_files, train_bpe
    from tests.corpus_builder import debian_copyright, stdlib_docstrings

    fs = s3fs.S3FileSystem(key=credentials["AWS_ACCESS_KEY_ID"], secret=credentials["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
    curated, web = stdlib_docstrings()[:240], debian_copyright(limit=160)  # enough for 40 steps of 8 x 64 tokens
    for part in range(2):  # two files per source, so the prefixes are real globs
        table = pa.table({"text": web[part::2], "url": [f"https://example.org/{part}/{i}" for i in range(len(web[part::2]))]})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        fs.pipe(f"{bucket}/corpus/web/part-{part}.parquet", sink.getvalue())
        lines = "".join(json.dumps({"text": text}) + "\n" for text in curated[part::2])
        fs.pipe(f"{bucket}/corpus/curated/part-{part}.jsonl.gz", gzip.compress(lines.encode()))

    eos = "<|endoftext|>"
    tokenizer = train_bpe(curated + web, vocab=512, min_frequency=2, eos_token=eos)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        for name, data in hf_files(tokenizer, eos).items():
            Path(folder, name).write_bytes(data)
        for path in sorted(Path(folder).iterdir()):
            fs.put_file(str(path), f"{bucket}/{BASE_PREFIX}/{path.name}")
    return {"web": len(web), "curated": len(curated), "vocab": tokenizer.get_vocab_size()}
