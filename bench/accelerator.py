"""gemb's train step (plain and gradient-cached) and inference on the accelerator present, next
to the PyTorch + transformers baseline (shared/bench/torch_baseline.py) with the same flags.

    python bench/accelerator.py                     # the default suite, gemb and the baseline
    python bench/accelerator.py --model gemma3-1b --mode train --batch 32   # one gemb case
    python bench/accelerator.py --tiny --no-baseline                        # CPU smoke run

One case (--mode given) prints one JSON line with the baseline's fields: train / gradcache:
step_s, tokens_per_s, pairs_per_s, mfu, peak_mem_gb; infer: fixed_128x512_tokens_per_s,
fixed_mfu, lognormal_texts_per_s, lognormal_tokens_per_s, mean_len (the baseline's lognormal
lengths: RandomState(0), lognormal(log 90, 0.8), clipped to 8..512; gemb packs them into rows of
up to 16 texts, the baseline pads length-sorted batches), plus compile_s (kept out of the
timings), the peak the MFU divides by and where it comes from. Models have random weights (speed
does not depend on them), the baseline's layout (no projection head, mean pooling, in-batch
softmax at --tau) and its precision: bf16 compute with fp32 params and AdamW for training, bf16
params for inference (fp32 on CPU). One device, whatever the machine has.

With no --mode, the default suite runs every case in its own process (so peak memory is per
case), gemb's and then the baseline's (`python torch_baseline.py --model ... --mode ...`, found
at shared/bench/ or ../shared/bench/ from the repository root, or --baseline PATH; recorded as
skipped, with the reason, without torch or CUDA), then prints a table of gemb / torch ratios and
one JSON line per case. MFU uses gemb.train.flops (window-aware attention), the baseline's own
formula counts full attention: compare the throughputs. Both divide by the baseline's PEAK (a
measured H200 bf16 matmul peak) in the suite; --peak-flops sets gemb's.

This script imports no gin, seqio or TensorFlow (accelerator machines may lack them); on a
machine without an accelerator it runs TINY sizes (--tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

MODELS = ("gemma3-270m", "gemma3-1b")
MODES = ("train", "gradcache", "infer")
ATTENTION_CHOICES = ("auto", "xla", "blockwise", "splash", "pallas_gpu", "cudnn")
BASELINE_RELATIVE_PATHS = ("shared/bench/torch_baseline.py", "../shared/bench/torch_baseline.py")
# The default suite: (name, flags) in the baseline's flag spelling.
SUITE = (
    ("270m train B128 q64/p256", ["--model", "gemma3-270m", "--mode", "train", "--batch", "128",
                                  "--query-len", "64", "--doc-len", "256"]),
    ("270m gradcache B1024 mb128 q32/p128",
     ["--model", "gemma3-270m", "--mode", "gradcache", "--batch", "1024", "--minibatch", "128",
      "--query-len", "32", "--doc-len", "128"]),
    ("1b train B32 q64/p256", ["--model", "gemma3-1b", "--mode", "train", "--batch", "32",
                               "--query-len", "64", "--doc-len", "256"]),
    ("270m infer", ["--model", "gemma3-270m", "--mode", "infer"]),
    ("1b infer", ["--model", "gemma3-1b", "--mode", "infer"]),
)
# Sizes of a case: the baseline's defaults, and TINY's (a CPU-sized smoke run).
FULL_SIZES = dict(batch=128, minibatch=128, query_len=64, doc_len=256, texts=8192, reps=10,
                  fixed_rows=128, fixed_len=512)
TINY_SIZES = dict(batch=4, minibatch=2, query_len=8, doc_len=16, texts=48, reps=1,
                  fixed_rows=4, fixed_len=64)
SUITE_REPS = 5  # per case; with --texts 4096 the suite fits in ~8 minutes on one H100 / H200
SUITE_TEXTS = 4096
CASE_TIMEOUT_S = 300
LOGNORMAL_SEGMENTS_PER_ROW = 16


def lognormal_lengths(count: int) -> np.ndarray:
    """The baseline's realistic text lengths, draw for draw (its infer())."""
    return np.clip(np.random.RandomState(0).lognormal(np.log(90), 0.8, count).astype(int), 8, 512)


# ------------------------------------------------------------------------------- one gemb case


def _encoder_config(args, on_accelerator: bool):
    from gemb.models.config import GEMMA3_1B, GEMMA3_270M, TINY, AttentionType, EncoderConfig

    if args.tiny:
        # TINY with one local and one global layer, scanned: every code path of the real
        # presets, at a quarter of TINY's compile time (the smoke test's budget is CPU seconds).
        transformer = TINY.replace(name="tiny_bench", num_layers=2, attention_pattern=(
            AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL))
    else:
        transformer = {"gemma3-270m": GEMMA3_270M, "gemma3-1b": GEMMA3_1B}[args.model]
    compute = "bfloat16" if on_accelerator else "float32"
    params = "bfloat16" if (on_accelerator and args.mode == "infer") else "float32"
    changes = dict(dtype=compute, param_dtype=params)
    has_backend = any(f.name == "attention_backend" for f in dataclasses.fields(transformer))
    if has_backend:
        changes["attention_backend"] = args.attention
    elif args.attention != "auto":
        raise SystemExit(f"--attention {args.attention}: this gemb's TransformerConfig has no "
                         "attention_backend field yet; drop --attention.")
    transformer = transformer.replace(**changes)
    # The baseline's model: mean pooling, no projection head, one Matryoshka width.
    return EncoderConfig(transformer=transformer, pooling="mean", head_dims=(),
                         matryoshka_dims=(transformer.embed_dim,))


def _one_device_partitioner():
    import jax

    from gemb.partitioning import mesh as mesh_lib
    from gemb.partitioning.partitioner import Partitioner

    return Partitioner(mesh_lib.create_mesh(devices=[jax.devices()[0]]))


def _peak_memory() -> tuple[float | None, str]:
    """(GB, where from): the device allocator's peak, else (CPU) the process's max RSS."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return round(stats["peak_bytes_in_use"] / 1e9, 2), "device peak_bytes_in_use"
    max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(max_rss_kb * 1024 / 1e9, 2), "host max RSS (no device memory stats)"


def _peak(args) -> tuple[float | None, str]:
    import jax

    from gemb.train import flops

    if args.peak_flops is not None:
        return args.peak_flops, args.peak_source or "--peak-flops"
    kind = jax.devices()[0].device_kind
    peak = flops.peak_flops_per_device(kind)
    if peak is None:
        return None, f"no bf16 peak known for {kind!r}: pass --peak-flops for an MFU"
    return peak, f"vendor bf16 dense peak of {kind!r} (gemb.train.flops)"


def _timed(run, warmup: int, reps: int) -> float:
    """Seconds per call of run() after warmup calls; waits for the device at the end only."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(run())
    start = time.perf_counter()
    out = None
    for _ in range(reps):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def _full_rows(rng, count: int, length: int, vocab: int):
    from gemb.data.feature_converter import RoleTokens

    return RoleTokens.from_lists(list(rng.integers(3, vocab, (count, length))))


def run_train(args, encoder) -> dict:
    """A train step (gradient-cached in mode gradcache) on full rows of random token ids, as the
    baseline's: every token real, no hard negatives."""
    from gemb.data.feature_converter import FeatureConverter, FeatureConverterConfig, TokenBatch
    from gemb.losses import ContrastiveLossConfig
    from gemb.train import flops, optimizers, trainer
    from gemb.train.model import EmbeddingModel

    chunk = args.minibatch if args.mode == "gradcache" else None
    if chunk and args.batch % chunk:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --minibatch {chunk}; "
                         "gradient caching embeds whole chunks.")
    rng = np.random.default_rng(0)
    vocab = encoder.transformer.vocab_size
    batch = TokenBatch(_full_rows(rng, args.batch, args.query_len, vocab),
                       _full_rows(rng, args.batch, args.doc_len, vocab),
                       _full_rows(rng, 0, 1, vocab), np.zeros(args.batch, np.int32))
    converter = FeatureConverter(FeatureConverterConfig(
        query_length=args.query_len, document_length=args.doc_len, bos_id=None))
    features = converter.convert(batch)
    model = EmbeddingModel(encoder, ContrastiveLossConfig(temperature=args.tau))
    # The baseline's torch.optim.AdamW(lr=1e-5): weight decay 0.01, no clipping.
    optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
        learning_rate=1e-5, schedule="constant", weight_decay=0.01, clip_norm=None), 1000)
    partitioner = _one_device_partitioner()
    step = trainer.Trainer(model, optimizer, partitioner,
                           trainer.StepConfig(gradient_cache_chunk=chunk))
    state = step.layout.create(step.layout.random_params(0), 0)
    placed = step.place(features)
    start = time.perf_counter()
    with partitioner.activation_context():
        compiled = step.train_jit(placed).lower(state, placed).compile()
    compile_s = time.perf_counter() - start

    def one_step():
        nonlocal state
        state, metrics = compiled(state, placed)
        return metrics["loss"]

    step_s = _timed(one_step, warmup=2, reps=args.reps)
    peak, peak_source = _peak(args)
    step_flops = flops.train_step_flops(encoder, features)
    memory, memory_source = _peak_memory()
    tokens = args.batch * (args.query_len + args.doc_len)
    return {"step_s": round(step_s, 4), "tokens_per_s": int(tokens / step_s),
            "pairs_per_s": int(args.batch / step_s),
            "mfu": round(step_flops / step_s / peak, 3) if peak else None,
            "peak_mem_gb": memory, "peak_mem_source": memory_source,
            "compile_s": round(compile_s, 1), "flops_per_step": step_flops,
            "peak_flops": peak, "peak_source": peak_source,
            "loss_finite": bool(np.isfinite(float(one_step())))}


def _pack_lognormal(lengths: np.ndarray, vocab: int, rows_per_call: int):
    """The texts packed into rows of up to 16 (gemb.data.feature_converter's first-fit
    decreasing), then cut into calls of at most rows_per_call rows (the last row block padded)."""
    from gemb.data.feature_converter import (FeatureConverter, FeatureConverterConfig,
                                             RoleTokens, TokenBatch)

    rng = np.random.default_rng(1)
    texts = RoleTokens(rng.integers(3, vocab, int(lengths.sum())).astype(np.int32),
                       lengths.astype(np.int64))
    # Texts go in as the query role (the positives are one-token stand-ins, never run); no BOS,
    # so a text is exactly its drawn length, as in the baseline. Row counts are left exact.
    count = len(lengths)
    batch = TokenBatch(texts, RoleTokens.from_lists([[3]] * count), RoleTokens.from_lists([]),
                       np.zeros(count, np.int32))
    config = FeatureConverterConfig(query_length=512, document_length=2,
                                    pack=True, bos_id=None,
                                    segments_per_row=LOGNORMAL_SEGMENTS_PER_ROW,
                                    row_buckets_per_octave=1 << 20)
    features = FeatureConverter(config).convert(batch)
    rows = len(features["query_tokens"])
    calls = math.ceil(rows / rows_per_call)
    per_call = math.ceil(rows / calls)  # equal calls: at most calls - 1 padding rows in all
    padded = {}
    for name in ("tokens", "segment_ids", "positions"):
        value = features[f"query_{name}"]
        padded[name] = np.concatenate(
            [value, np.zeros((calls * per_call - rows, value.shape[1]), value.dtype)])
    chunks = [tuple(padded[name][i * per_call:(i + 1) * per_call]
                    for name in ("tokens", "segment_ids", "positions")) for i in range(calls)]
    return chunks, features["query_slot"], padded["segment_ids"]


def run_infer(args, encoder, sizes) -> dict:
    """Embeddings (normalised, mean-pooled) of fixed 128 x 512 rows, then of the lognormal
    texts packed."""
    import jax
    import jax.numpy as jnp

    from gemb.models.encoder import Encoder, init_tokens
    from gemb.models.heads import l2_normalize
    from gemb.train import flops

    partitioner = _one_device_partitioner()
    module = Encoder(encoder)
    params = jax.jit(lambda: module.init(jax.random.key(0), init_tokens())["params"])()
    from flax import linen as nn

    params = nn.unbox(params)
    rows_per_call, length = sizes["fixed_rows"], sizes["fixed_len"]

    def embed(params, tokens, segment_ids, positions, num_segments):
        with partitioner.activation_context():
            out = module.apply({"params": params}, tokens, segment_ids, positions,
                               num_segments=num_segments)
        return l2_normalize(out["projected"])

    forward = jax.jit(embed, static_argnums=(4,))
    vocab = encoder.transformer.vocab_size
    rng = np.random.default_rng(0)
    fixed = (jnp.asarray(rng.integers(3, vocab, (rows_per_call, length)), jnp.int32),
             jnp.ones((rows_per_call, length), jnp.int32),
             jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows_per_call, length)))
    start = time.perf_counter()
    compiled_fixed = forward.lower(params, *fixed, 1).compile()
    compile_s = time.perf_counter() - start
    fixed_s = _timed(lambda: compiled_fixed(params, *fixed), warmup=3, reps=args.reps)
    peak, peak_source = _peak(args)
    fixed_flops = flops.encoder_forward_flops(encoder, np.ones((rows_per_call, length)))

    lengths = lognormal_lengths(args.texts)
    start = time.perf_counter()
    chunks, slots, all_segment_ids = _pack_lognormal(lengths, vocab, rows_per_call)
    pack_s = time.perf_counter() - start
    chunks = [tuple(jnp.asarray(x) for x in chunk) for chunk in chunks]
    slots = jnp.asarray(slots)
    start = time.perf_counter()
    compiled_packed = forward.lower(params, *chunks[0], LOGNORMAL_SEGMENTS_PER_ROW).compile()
    compile_s += time.perf_counter() - start

    def embed_all():
        outs = [compiled_packed(params, *chunk) for chunk in chunks]
        merged = jnp.concatenate(outs)
        return merged.reshape(-1, merged.shape[-1])[slots]  # one embedding per text, in order

    lognormal_s = _timed(embed_all, warmup=1, reps=1)  # the baseline's warmup and reps
    lognormal_flops = flops.encoder_forward_flops(encoder, all_segment_ids)
    memory, memory_source = _peak_memory()
    out = {"fixed_128x512_tokens_per_s": int(rows_per_call * length / fixed_s),
           "fixed_mfu": round(fixed_flops / fixed_s / peak, 3) if peak else None,
           "lognormal_texts_per_s": int(len(lengths) / lognormal_s),
           "lognormal_tokens_per_s": int(lengths.sum() / lognormal_s),
           "mean_len": round(float(lengths.mean()), 1),
           "lognormal_mfu": round(lognormal_flops / lognormal_s / peak, 3) if peak else None,
           "lognormal_rows": int(sum(len(c[0]) for c in chunks)),
           "lognormal_padding": round(float((all_segment_ids == 0).mean()), 3),
           "pack_s": round(pack_s, 2), "compile_s": round(compile_s, 1),
           "peak_mem_gb": memory, "peak_mem_source": memory_source,
           "peak_flops": peak, "peak_source": peak_source}
    if (rows_per_call, length) != (128, 512):
        out["fixed_shape"] = [rows_per_call, length]  # --tiny: the field keeps its name
    return out


def run_case(args) -> dict:
    """One gemb case in this process: the JSON record."""
    import jax

    platform = jax.default_backend()
    on_accelerator = platform != "cpu"
    if not on_accelerator and not args.tiny:
        print("No accelerator: running --tiny sizes (TINY model) on CPU.", file=sys.stderr)
        args.tiny = True
    sizes = _sizes(args)
    encoder = _encoder_config(args, on_accelerator)
    result = run_infer(args, encoder, sizes) if args.mode == "infer" else run_train(args, encoder)
    record = {"impl": "gemb", "model": args.model, "mode": args.mode, "batch": args.batch,
              "query_len": args.query_len, "doc_len": args.doc_len}
    if args.mode == "gradcache":
        record["minibatch"] = args.minibatch
    if args.mode == "infer":
        record["texts"] = args.texts
    record.update(result)
    record.update({"tiny": args.tiny, "platform": platform,
                   "device_kind": jax.devices()[0].device_kind,
                   "attention": args.attention, "dtype": encoder.transformer.dtype,
                   "param_dtype": encoder.transformer.param_dtype, "reps": args.reps,
                   "jax": jax.__version__,
                   # What this run imported of what accelerator machines may lack (none, or
                   # the script breaks there): tests/test_bench_accelerator.py checks it.
                   "loaded_gin_seqio_tensorflow": sorted(
                       m for m in ("gin", "seqio", "tensorflow") if m in sys.modules)})
    return record


def _sizes(args) -> dict:
    """Fills the size flags left unset with the baseline's defaults (or TINY's)."""
    sizes = TINY_SIZES if args.tiny else FULL_SIZES
    for name in ("batch", "minibatch", "query_len", "doc_len", "texts", "reps"):
        if getattr(args, name) is None:
            setattr(args, name, sizes[name])
    return sizes


# ------------------------------------------------------------------------------------ the suite


def find_baseline(explicit: str | None) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise SystemExit(f"--baseline {explicit} does not exist; point it at "
                             "torch_baseline.py or drop it.")
        return path
    for relative in BASELINE_RELATIVE_PATHS:
        path = (REPO_ROOT / relative).resolve()
        if path.is_file():
            return path
    return None


def baseline_peak(path: Path) -> float | None:
    """The PEAK constant the baseline divides by (so both MFUs share it)."""
    match = re.search(r"^PEAK\s*=\s*([0-9.eE+_]+)", path.read_text(), re.MULTILINE)
    return float(match.group(1).replace("_", "")) if match else None


def baseline_unavailable(path: Path | None, tiny: bool, no_baseline: bool) -> str | None:
    """Why the baseline cannot run here, or None."""
    if no_baseline:
        return "--no-baseline"
    if tiny:
        return "--tiny sizes have no baseline (it runs the real presets on CUDA)"
    if path is None:
        return ("torch_baseline.py not found at " + " or ".join(BASELINE_RELATIVE_PATHS)
                + " from the repository root; pass --baseline PATH")
    check = subprocess.run(
        [sys.executable, "-c", "import sys, torch, transformers; "
         "sys.exit(0 if torch.cuda.is_available() else 3)"],
        capture_output=True, text=True, timeout=300)
    if check.returncode == 3:
        return "torch has no CUDA device here"
    if check.returncode:
        return "torch / transformers cannot be imported: " + check.stderr.strip()[-300:]
    return None


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _run_json(command: list[str], env=None) -> dict:
    """A case's JSON line from a subprocess, or {"error": ...}."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CASE_TIMEOUT_S,
                                env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CASE_TIMEOUT_S} s"}
    record = _last_json(result.stdout)
    if result.returncode or record is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {result.returncode}: " + " | ".join(tail)}
    return record


RATIO_FIELDS = {"train": ("tokens_per_s",), "gradcache": ("tokens_per_s",),
                "infer": ("fixed_128x512_tokens_per_s", "lognormal_texts_per_s")}


def ratios(mode: str, gemb: dict, baseline: dict) -> dict:
    """gemb / torch for each throughput field both have (higher is better for gemb)."""
    out = {}
    for field in RATIO_FIELDS[mode]:
        if gemb.get(field) and baseline.get(field):
            out[field] = round(gemb[field] / baseline[field], 2)
    return out


def accelerator_platform() -> str:
    """jax's default backend, asked in a child process: this one stays off the device, whose
    memory the cases (each in its own process) and the baseline need."""
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True, timeout=300)
    return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 else "cpu"


def run_suite(args) -> int:
    suite_start = time.perf_counter()
    if not args.tiny and accelerator_platform() == "cpu":
        print("No accelerator: the suite runs --tiny sizes (TINY model) on CPU.", file=sys.stderr)
        args.tiny = True
    baseline_path = find_baseline(args.baseline)
    skip_reason = baseline_unavailable(baseline_path, args.tiny, args.no_baseline)
    peak_flags = []
    if args.peak_flops is not None:
        peak_flags = ["--peak-flops", repr(args.peak_flops)]
    elif baseline_path is not None and skip_reason is None:
        peak = baseline_peak(baseline_path)
        if peak:
            peak_flags = ["--peak-flops", repr(peak), "--peak-source",
                          f"{baseline_path.name} PEAK (the baseline's, shared for comparison)"]
    # Reps and texts for both sides (--tiny: TINY_SIZES unless given).
    reps, texts = args.reps, args.texts
    if not args.tiny:
        reps, texts = reps or SUITE_REPS, texts or SUITE_TEXTS
    shared = [*(["--reps", str(reps)] if reps else []), *(["--texts", str(texts)] if texts else [])]
    rows = []
    for name, flags in SUITE:
        if args.tiny:
            if flags[1] != "gemma3-270m":
                continue  # under --tiny every model is the same TINY one
            flags = flags[:4]  # model and mode; the sizes are TINY_SIZES
            name = f"tiny {flags[3]}"
        mode = flags[flags.index("--mode") + 1]
        gemb_command = [sys.executable, str(Path(__file__).resolve()), *flags, *shared,
                        "--attention", args.attention, *peak_flags,
                        *(["--tiny"] if args.tiny else [])]
        print(f"[{name}] gemb ...", file=sys.stderr, flush=True)
        gemb = _run_json(gemb_command)
        if skip_reason:
            baseline = {"skipped": skip_reason}
        else:
            print(f"[{name}] torch baseline ...", file=sys.stderr, flush=True)
            baseline = _run_json([sys.executable, str(baseline_path), *flags, *shared])
        rows.append({"case": name, "mode": mode, "gemb": gemb, "baseline": baseline,
                     "gemb_over_torch": ratios(mode, gemb, baseline)})
    print_table(rows)
    print(f"suite: {len(rows)} cases in {time.perf_counter() - suite_start:.0f} s", flush=True)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 1 if any("error" in row["gemb"] for row in rows) else 0


def print_table(rows: list[dict]) -> None:
    header = (f"{'case':<38} {'metric':<28} {'gemb':>12} {'torch':>12} {'gemb/torch':>10}  "
              f"{'mfu gemb':>8} {'mfu torch':>9} {'GB gemb':>8} {'GB torch':>8}")
    print(header)
    print("-" * len(header))
    for row in rows:
        gemb, baseline = row["gemb"], row["baseline"]
        if "error" in gemb:
            print(f"{row['case']:<38} gemb failed: {gemb['error'][:200]}")
            continue
        mfu_field = "fixed_mfu" if row["mode"] == "infer" else "mfu"
        for field in RATIO_FIELDS[row["mode"]]:
            theirs = baseline.get(field)
            ratio = row["gemb_over_torch"].get(field)
            print(f"{row['case']:<38} {field:<28} {gemb.get(field, 'n/a'):>12} "
                  f"{theirs if theirs is not None else 'n/a':>12} "
                  f"{ratio if ratio is not None else 'n/a':>10}  "
                  f"{_show(gemb.get(mfu_field)):>8} {_show(baseline.get(mfu_field)):>9} "
                  f"{_show(gemb.get('peak_mem_gb')):>8} {_show(baseline.get('peak_mem_gb')):>8}")
        if "skipped" in baseline or "error" in baseline:
            print(f"{'':<38} baseline: {baseline.get('skipped') or baseline.get('error')}")


def _show(value) -> str:
    return "n/a" if value is None else str(value)


# ---------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", choices=MODELS)
    parser.add_argument("--mode", default=None, choices=MODES,
                        help="one case; without it, the default suite (module docstring)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--minibatch", type=int, default=None,
                        help="gradient-cache chunk (rows embedded at once), mode gradcache")
    parser.add_argument("--query-len", type=int, default=None)
    parser.add_argument("--doc-len", type=int, default=None)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--texts", type=int, default=None, help="lognormal texts, mode infer")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                        help="TransformerConfig.attention_backend ('auto': the platform's best)")
    parser.add_argument("--tiny", action="store_true",
                        help="TINY model and sizes (CPU smoke run; the baseline is skipped)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="bf16 FLOP/s of one device for MFU (default: the suite uses the "
                             "baseline's PEAK, one case the vendor table of gemb.train.flops)")
    parser.add_argument("--peak-source", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default=None, help="path of torch_baseline.py")
    parser.add_argument("--no-baseline", action="store_true", help="suite: gemb only")
    args = parser.parse_args(argv)
    for name in ("batch", "minibatch", "query_len", "doc_len", "texts", "reps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.peak_flops is not None and not args.peak_flops > 0:
        parser.error(f"--peak-flops must be a positive FLOP/s figure, got {args.peak_flops}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode is None:
        return run_suite(args)
    print(json.dumps(run_case(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
