"""gpu: tokens/s per GPU and MFU of a ~1B-parameter Llama at sequence length 2048, DeepSpeed ZeRO-2
in bf16 on one CUDA GPU (plain DeepSpeed in this process: no Ray, no launcher), against a plain
PyTorch loop on the same model in the same run.

Model: ``LlamaConfig`` hidden 2048, intermediate 5504, 16 layers, 16 heads (no grouped-query
attention), vocabulary 32,000, untied embeddings, SDPA attention: 0.94B parameters. Data: random
token ids from a seeded ``torch.Generator`` (a fresh micro-batch each step; throughput does not
depend on the text). Micro-batch: 8 sequences on a GPU with 70 GiB or more, 4 with 35 GiB or
more, else 2 (``TRECFLOW_BENCH_GPU_MICRO`` overrides); a step that runs out of memory halves it
and starts over. No gradient accumulation, no activation checkpointing.

- DeepSpeed: ``deepspeed.initialize`` with ZeRO stage 2 (overlap_comm, contiguous gradients),
  bf16 (bf16 weights and gradients, fp32 master weights and Adam moments in the ZeRO optimizer),
  gradient clipping 1.0 and AdamW (betas 0.9/0.95, weight decay 0.1, constant LR 3e-4): torch's
  AdamW (``torch_adam``, foreach), or DeepSpeed's FusedAdam with
  ``TRECFLOW_BENCH_GPU_OPTIMIZER=fused`` (JIT-built with ninja and nvcc for this GPU's
  ``major.minor`` when ``TORCH_CUDA_ARCH_LIST`` holds entries such as ``9.0a`` that DeepSpeed's
  builder cannot parse; falls back to torch's, on a fresh model, when it cannot be built). The
  process initializes torch.distributed itself (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
  ``WORLD_SIZE``/``LOCAL_RANK`` defaulted for one process, NCCL) through
  ``deepspeed.init_distributed``.
- loop (baseline): the same model in fp32 under ``torch.autocast(bfloat16)``, torch's AdamW with
  ``fused=True`` and the same hyper-parameters, clipping 1.0; run after the DeepSpeed engine is
  freed (skipped, with a line saying so, if it does not fit; ``TRECFLOW_BENCH_GPU_BASELINE=0``
  skips it).

Each side runs `WARMUP` steps that are not measured (``TRECFLOW_BENCH_GPU_WARMUP``), then `STEPS`
measured steps (``TRECFLOW_BENCH_GPU_STEPS``); each step is timed from the batch's creation to the
loss read back (``torch.cuda.synchronize`` on both ends). tokens/s/GPU = micro-batch x 2048 /
mean step time (one GPU). MFU = 6 N tokens/s / peak, N = every parameter (the PaLM convention);
also with attention, (6 N + 12 L d s) tokens/s / peak (L layers, d hidden, s sequence length:
attention scores and values, causal masking not discounted). Peak: dense bf16 tensor FLOP/s by GPU
name (H100/H200/H800/GH200 989e12, A100/A800 312e12, L40S 362e12, A10G/A10 125e12, L4 121e12),
or ``TRECFLOW_BENCH_PEAK_FLOPS``; unknown GPUs print no MFU. Memory:
``torch.cuda.max_memory_allocated`` over the measured run (and reserved).

Re-evaluation (stage 5, forward only), after both training sides, same run: the same model shape
(randomly initialized, seed 1234) is saved once in fp32 with ``save_pretrained`` to a temporary
folder and loaded through the real code path, ``training.reevaluation.load_eval_model(ModelSpec(
uri=folder, precision="bf16", use_gpu=True))`` (load time printed); then
``training.reevaluation.sequence_losses(model, tokens, micro)`` on int32 numpy token arrays of
micro x 2048 random ids (a fresh array each call), `WARMUP` calls unmeasured, then `STEPS` timed
calls (each returns the losses on the host, so it is synchronous). Micro-batches: 16 and 32 on a
GPU with 70 GiB or more, 8 and 16 with 35 GiB or more, else 4
(``TRECFLOW_BENCH_GPU_REEVAL_MICRO``, comma-separated, overrides); one that runs out of memory is
reported and skipped. tokens/s = micro x 2048 / mean call time; MFU with forward FLOPs 2 N per token
(and 2 N + 4 L d s with attention); ratio = re-evaluation tokens/s / DeepSpeed training tokens/s
of this run. bf16 check: the per-sequence losses of 8 fresh sequences from the bf16 load and from
an fp32 load (``precision="fp32"``) of the same folder: both means, max and mean |difference|.
``TRECFLOW_BENCH_GPU_REEVAL=0`` skips this part.

Without CUDA it prints one line and returns (exit status 0).

Smoke mode (``python -m bench gpu --smoke``): the same three parts (DeepSpeed ZeRO-2 bf16, the
loop, re-evaluation through `training.reevaluation` with the bf16/fp32 check) on a 2-layer
hidden-64 Llama (`SMOKE_SHAPE`), sequences of `SMOKE_SEQ_LEN` (64) tokens, 1 warm-up + 2 measured
steps, micro-batch 2 (re-evaluation 2 and 4). On a CUDA device it runs there (NCCL); without one
it runs on the CPU (gloo; the re-evaluation loads with ``use_gpu=False``), so it checks the code
paths, the FLOP and MFU arithmetic (no MFU on a CPU: unknown peak) and the printed report, but
measures nothing about GPUs.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
import time

HIDDEN = 2048
INTERMEDIATE = 5504
LAYERS = 16
HEADS = 16
VOCAB = 32000
SEQ_LEN = 2048
WARMUP = int(os.environ.get("TRECFLOW_BENCH_GPU_WARMUP", "5"))
STEPS = int(os.environ.get("TRECFLOW_BENCH_GPU_STEPS", "30"))
SEED = 1234
LR = 3e-4
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
CLIP = 1.0
# Dense (no sparsity) bf16 tensor-core peak FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("L4", 121e12),
)
NO_CUDA = "no CUDA device: the GPU benchmark needs one"
SMOKE_SHAPE = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4}
SMOKE_SEQ_LEN = 64
SMOKE_WARMUP, SMOKE_STEPS, SMOKE_MICRO, SMOKE_REEVAL_MICROS = 1, 2, 2, [2, 4]


def llama_config(**overrides):
    from transformers import LlamaConfig

    shape = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
    )
    shape.update(overrides)
    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    return config


def peak_flops(device_name: str) -> float | None:
    override = os.environ.get("TRECFLOW_BENCH_PEAK_FLOPS")
    if override:
        return float(override)
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value
    return None


def flops_per_token(parameters: int, config, seq_len: int) -> tuple[float, float]:
    """(6 N, 6 N + 12 L d s): training FLOPs per token without and with attention."""
    dense = 6.0 * parameters
    return dense, dense + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def forward_flops_per_token(parameters: int, config, seq_len: int) -> tuple[float, float]:
    """(2 N, 2 N + 4 L d s): forward-only FLOPs per token without and with attention, a third of
    training's (the backward pass costs twice the forward)."""
    dense, with_attention = flops_per_token(parameters, config, seq_len)
    return dense / 3, with_attention / 3


def deepspeed_config(micro: int, optimizer: str) -> dict:
    params = {"lr": LR, "betas": list(BETAS), "eps": 1e-8, "weight_decay": WEIGHT_DECAY}
    if optimizer == "torch":
        params["torch_adam"] = True
    return {
        "train_batch_size": micro,  # one GPU, no accumulation
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": params},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def default_micro_batch(total_bytes: int) -> int:
    if "TRECFLOW_BENCH_GPU_MICRO" in os.environ:
        return int(os.environ["TRECFLOW_BENCH_GPU_MICRO"])
    gib = total_bytes / 2**30
    return 8 if gib >= 70 else 4 if gib >= 35 else 2


def init_distributed(backend: str = "nccl") -> None:
    """One process as a world of one, without a launcher."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(config, micro: int, seq_len: int, device):
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(SEED)
    while True:
        yield torch.randint(0, config.vocab_size, (micro, seq_len), generator=generator, device=device)


def _build_model(config, device):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    return model


def _timed_steps(step, batches, device, warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each measured step and the last loss; the peak-memory counter is reset after
    the warm-up."""
    import torch

    loss = float("nan")
    for _ in range(warmup):
        loss = step(next(batches))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        loss = step(next(batches))  # reads the loss back: the step has finished on the device
        _sync(device)
        seconds.append(time.perf_counter() - began)
    return seconds, loss


@contextlib.contextmanager
def _jit_arch_list(device, needed: bool):
    """``TORCH_CUDA_ARCH_LIST`` as this GPU's ``major.minor`` while DeepSpeed JIT-builds an op, when
    the environment's list has an entry its builder cannot parse (it reads ``int.int[+PTX]``; CUDA
    images set e.g. ``9.0a``, which fails with "invalid literal for int() ... '0a'")."""
    import re

    import torch

    current = os.environ.get("TORCH_CUDA_ARCH_LIST")
    entries = (current or "").replace(" ", ";").split(";")
    if not needed or current is None or all(re.fullmatch(r"\d+\.\d+(\+PTX)?", entry) for entry in entries if entry):
        yield
        return
    major, minor = torch.cuda.get_device_capability(device)
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    try:
        yield
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = current


def measure_deepspeed(config, micro: int, seq_len: int, device, optimizer: str, warmup: int = WARMUP, steps: int = STEPS) -> dict:
    import deepspeed
    import torch

    model = _build_model(config, device)
    parameters = sum(p.numel() for p in model.parameters())
    failed = None
    try:
        with _jit_arch_list(device, optimizer == "fused"):
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=deepspeed_config(micro, optimizer))
    except Exception as error:  # FusedAdam that cannot be built here
        if optimizer == "torch" or isinstance(error, torch.cuda.OutOfMemoryError):
            raise
        failed = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    if failed is not None:  # outside the except block: its traceback no longer holds the failed engine
        print(f"  FusedAdam unavailable ({failed}); using torch's AdamW")
        optimizer = "torch"
        model = None
        _free(device)
        model = _build_model(config, device)  # a fresh model: the failed engine left its forward hooks on the old one
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(micro, optimizer))
    inner = type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__

    def step(batch) -> float:
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    try:
        seconds, loss = _timed_steps(step, _batches(config, micro, seq_len, device), device, warmup, steps)
        return {"seconds": seconds, "loss": loss, "parameters": parameters, "optimizer": inner, **_memory(device)}
    finally:
        engine.destroy() if hasattr(engine, "destroy") else None
        engine = model = None  # drop the references before freeing GPU memory
        _free(device)


def measure_loop(config, micro: int, seq_len: int, device, warmup: int = WARMUP, steps: int = STEPS) -> dict:
    """The plain PyTorch loop: fp32 weights, bf16 autocast, fused AdamW, clipping."""
    import torch

    model = _build_model(config, device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=1e-8, weight_decay=WEIGHT_DECAY, fused=fused)

    def step(batch) -> float:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    try:
        seconds, loss = _timed_steps(step, _batches(config, micro, seq_len, device), device, warmup, steps)
        return {"seconds": seconds, "loss": loss, "optimizer": f"AdamW(fused={fused})", **_memory(device)}
    finally:
        optimizer = model = None  # drop the references before freeing GPU memory
        _free(device)


def reevaluation_micro_batches(total_bytes: int) -> list[int]:
    if "TRECFLOW_BENCH_GPU_REEVAL_MICRO" in os.environ:
        return [int(value) for value in os.environ["TRECFLOW_BENCH_GPU_REEVAL_MICRO"].split(",") if value.strip()]
    gib = total_bytes / 2**30
    return [16, 32] if gib >= 70 else [8, 16] if gib >= 35 else [4]


def save_random_model(config, device, folder: str) -> None:
    """The benchmark's model, randomly initialized (seed `SEED`), saved in fp32 as a HF folder."""
    model = _build_model(config, device)
    model.save_pretrained(folder)
    model = None
    _free(device)


def measure_reevaluation(folder: str, micros: list[int], seq_len: int, device, warmup: int = WARMUP, steps: int = STEPS,
                         check_rows: int = 8, vocab: int = VOCAB) -> dict:
    """Stage 5's forward-only loss through `training.reevaluation`: bf16 throughput per micro-batch,
    then bf16 against fp32 per-sequence losses of the same weights on one batch."""
    import numpy as np
    import torch

    from training.reevaluation import ModelSpec, load_eval_model, sequence_losses

    use_gpu = device.type == "cuda"
    _sync(device)
    began = time.perf_counter()
    model = load_eval_model(ModelSpec(uri=folder, precision="bf16", use_gpu=use_gpu))
    _sync(device)
    load_seconds = time.perf_counter() - began
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    rng = np.random.default_rng(SEED)

    def batches(micro: int):
        while True:
            yield rng.integers(0, vocab, (micro, seq_len), dtype=np.int32)

    runs = []
    for micro in micros:
        out_of_memory = False
        try:
            seconds, loss = _timed_steps(lambda batch, m=micro: float(sequence_losses(model, batch, m).mean()), batches(micro),
                                         device, warmup, steps)
            runs.append({"micro": micro, "seconds": seconds, "loss": loss, **_memory(device)})
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # outside the except block: its traceback no longer holds the call's tensors
            runs.append({"micro": micro, "out_of_memory": True})
        _free(device)

    check = np.random.default_rng(SEED + 1).integers(0, vocab, (check_rows, seq_len), dtype=np.int32)
    bf16 = sequence_losses(model, check, check_rows)
    model = None
    _free(device)
    model = load_eval_model(ModelSpec(uri=folder, precision="fp32", use_gpu=use_gpu))
    fp32 = sequence_losses(model, check, check_rows)
    model = None
    _free(device)
    difference = np.abs(bf16 - fp32)
    return {"load_seconds": load_seconds, "dtype": dtype, "runs": runs, "check_rows": check_rows, "mean_bf16": float(bf16.mean()),
            "mean_fp32": float(fp32.mean()), "max_abs_diff": float(difference.max()), "mean_abs_diff": float(difference.mean())}


def _memory(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_allocated": 0, "peak_reserved": 0}
    return {"peak_allocated": torch.cuda.max_memory_allocated(device), "peak_reserved": torch.cuda.max_memory_reserved(device)}


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def with_smaller_batches(measure, micro: int, what: str):
    """``measure(micro)``, halving the micro-batch after an out-of-memory error."""
    import torch

    while True:
        try:
            return micro, measure(micro)
        except torch.cuda.OutOfMemoryError:
            if micro == 1:
                raise
        _free(torch.device("cuda"))  # outside the except block: its traceback no longer holds the step's tensors
        print(f"  {what}: out of memory at micro-batch {micro}; trying {micro // 2}", flush=True)
        micro //= 2


def summarize(result: dict, micro: int, seq_len: int, per_token: tuple[float, float], peak: float | None) -> dict:
    seconds = sorted(result["seconds"])
    mean = sum(seconds) / len(seconds)
    tokens_per_second = micro * seq_len / mean
    return {
        "mean": mean,
        "median": seconds[len(seconds) // 2],
        "p90": seconds[min(len(seconds) - 1, math.ceil(0.9 * len(seconds)) - 1)],
        "tokens_per_second": tokens_per_second,
        "mfu": tokens_per_second * per_token[0] / peak if peak else None,
        "mfu_attention": tokens_per_second * per_token[1] / peak if peak else None,
    }


def _count(parameters: int) -> str:
    """``0.94B``, or ``0.26M`` for a model under 0.1B parameters (the smoke mode's)."""
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e8 else f"{parameters / 1e6:.2f}M"


def _flops(value: float) -> str:
    """``5.66 G``, or ``1.23 M`` under 0.1 G (the smoke mode's tiny model)."""
    return f"{value / 1e9:.2f} G" if value >= 1e8 else f"{value / 1e6:.2f} M"


def run(smoke: bool = False) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not smoke:
        print(NO_CUDA)
        return
    began = time.perf_counter()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        properties = torch.cuda.get_device_properties(device)
        name, total_memory = properties.name, properties.total_memory
        peak = peak_flops(name)
    else:  # smoke mode on a machine without CUDA: the same code paths on the CPU
        device = torch.device("cpu")
        name, total_memory = "CPU (no CUDA device)", 0
        peak = peak_flops(name)  # TRECFLOW_BENCH_PEAK_FLOPS, else unknown
        from training.cpt_job import _skip_inference_shm_op

        _skip_inference_shm_op()  # DeepSpeed's CPU shared-memory op: only inference uses it, building it takes minutes
    init_distributed("nccl" if cuda else "gloo")
    import torch.distributed as dist

    import deepspeed
    import transformers

    nccl = f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if cuda else "no CUDA"
    print(f"versions: torch {torch.__version__} (CUDA {torch.version.cuda}, {nccl}), "
          f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}; torch.distributed "
          f"{dist.get_backend()} backend, world {dist.get_world_size()}, rank {dist.get_rank()}", flush=True)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained/from_pretrained progress bars
    if smoke:
        config = llama_config(**SMOKE_SHAPE, max_position_embeddings=SMOKE_SEQ_LEN)
        seq_len, warmup, steps, micro = SMOKE_SEQ_LEN, SMOKE_WARMUP, SMOKE_STEPS, SMOKE_MICRO
        reeval_micros = list(SMOKE_REEVAL_MICROS)
        print(f"gpu: smoke mode on {device.type}: tiny sizes, not a measurement", flush=True)
    else:
        config = llama_config()
        seq_len, warmup, steps, micro = SEQ_LEN, WARMUP, STEPS, default_micro_batch(total_memory)
        reeval_micros = reevaluation_micro_batches(total_memory)
    shape = (f"hidden {config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers} layers, "
             f"{config.num_attention_heads} heads, vocab {config.vocab_size}")
    optimizer = "fused" if os.environ.get("TRECFLOW_BENCH_GPU_OPTIMIZER", "torch") == "fused" else "torch"
    print(f"gpu: {name} ({total_memory / 2**30:.0f} GiB), peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}; "
          f"{warmup} warm-up + {steps} measured steps per side ...", flush=True)

    micro, ds = with_smaller_batches(lambda m: measure_deepspeed(config, m, seq_len, device, optimizer, warmup, steps), micro,
                                     "deepspeed")
    per_token = flops_per_token(ds["parameters"], config, seq_len)
    ds_summary = summarize(ds, micro, seq_len, per_token, peak)
    loop = loop_summary = None
    if os.environ.get("TRECFLOW_BENCH_GPU_BASELINE", "1") != "0":
        try:
            loop = measure_loop(config, micro, seq_len, device, warmup, steps)
            loop_summary = summarize(loop, micro, seq_len, per_token, peak)
        except torch.cuda.OutOfMemoryError:
            print(f"  loop baseline: out of memory at micro-batch {micro} (after the DeepSpeed run): skipped")
        _free(device)
    reeval = None
    if os.environ.get("TRECFLOW_BENCH_GPU_REEVAL", "1") != "0":
        import tempfile

        print("re-evaluation: saving the model, then load_eval_model + sequence_losses ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="trecflow-bench-gpu-") as folder:
            save_random_model(config, device, folder)
            reeval = measure_reevaluation(folder, reeval_micros, seq_len, device, warmup, steps, vocab=config.vocab_size)

    def pct(value: float | None) -> str:
        return f"{100 * value:5.1f}%" if value is not None else "  n/a"

    print()
    print(f"gpu: Llama {_count(ds['parameters'])} parameters ({shape}), seq {seq_len}, micro-batch {micro} "
          f"({micro * seq_len:,} tokens/step), one {'GPU' if cuda else 'CPU'}: {name}")
    print(f"  {'':<40} {'tokens/s/GPU':>12} {'step ms':>8} {'median':>7} {'p90':>7} {'MFU 6N':>7} {'+attn':>7} "
          f"{'peak alloc':>10} {'reserved':>9} {'loss':>7}")
    rows = [(f"DeepSpeed ZeRO-2 bf16, {ds['optimizer']}", ds, ds_summary)]
    if loop is not None:
        rows.append((f"loop, autocast bf16, {loop['optimizer']}", loop, loop_summary))
    for label, result, summary in rows:
        print(f"  {label:<40} {summary['tokens_per_second']:>12,.0f} {1e3 * summary['mean']:>8.1f} {1e3 * summary['median']:>7.1f} "
              f"{1e3 * summary['p90']:>7.1f} {pct(summary['mfu']):>7} {pct(summary['mfu_attention']):>7} "
              f"{result['peak_allocated'] / 2**30:>8.1f} G {result['peak_reserved'] / 2**30:>7.1f} G {result['loss']:>7.3f}")
    print(f"  (steps {warmup + 1}..{warmup + steps} of each side; FLOPs per token {_flops(per_token[0])} (6N), "
          f"{_flops(per_token[1])} with attention; random tokens: loss ~ ln {config.vocab_size} = {math.log(config.vocab_size):.2f})")
    if loop_summary is not None:
        print(f"  ratio DeepSpeed / loop tokens/s   {ds_summary['tokens_per_second'] / loop_summary['tokens_per_second']:.2f}")
    if reeval is not None:
        forward = forward_flops_per_token(ds["parameters"], config, seq_len)
        print()
        print(f"re-evaluation (stage 5, forward only): training.reevaluation.load_eval_model(precision=bf16, "
              f"use_gpu={cuda}) + sequence_losses, seq {seq_len}; weights {reeval['dtype']}, loaded in "
              f"{reeval['load_seconds']:.1f} s (fp32 folder)")
        print(f"  {'micro-batch':<12} {'tokens/s':>12} {'call ms':>8} {'median':>7} {'p90':>7} {'MFU 2N':>7} {'+attn':>7} "
              f"{'peak alloc':>10} {'reserved':>9} {'loss':>7} {'/ DeepSpeed train':>18}")
        for run_ in reeval["runs"]:
            if run_.get("out_of_memory"):
                print(f"  {run_['micro']:<12} out of memory: skipped")
                continue
            summary = summarize(run_, run_["micro"], seq_len, forward, peak)
            print(f"  {run_['micro']:<12} {summary['tokens_per_second']:>12,.0f} {1e3 * summary['mean']:>8.1f} "
                  f"{1e3 * summary['median']:>7.1f} {1e3 * summary['p90']:>7.1f} {pct(summary['mfu']):>7} "
                  f"{pct(summary['mfu_attention']):>7} {run_['peak_allocated'] / 2**30:>8.1f} G {run_['peak_reserved'] / 2**30:>7.1f} G "
                  f"{run_['loss']:>7.3f} {summary['tokens_per_second'] / ds_summary['tokens_per_second']:>17.2f}x")
        print(f"  (calls {warmup + 1}..{warmup + steps} per micro-batch; forward FLOPs per token {_flops(forward[0])} (2N), "
              f"{_flops(forward[1])} with attention; ratio against the DeepSpeed ZeRO-2 bf16 training tokens/s above)")
        print(f"  bf16 vs fp32 per-sequence loss, same weights, {reeval['check_rows']} sequences: mean bf16 {reeval['mean_bf16']:.4f}, "
              f"mean fp32 {reeval['mean_fp32']:.4f}, max |diff| {reeval['max_abs_diff']:.2e}, mean |diff| {reeval['mean_abs_diff']:.2e}")
    print(f"  total benchmark time {time.perf_counter() - began:.0f} s")

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run()
