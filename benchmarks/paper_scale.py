"""Paper scale, measured: one GradCache training step of the full-size Qwen3-VL-4B-Instruct
architecture at the authors' batch and chunk sizes, in bfloat16 with SDPA attention.

What it builds
--------------
Qwen3-VL-4B-Instruct's published architecture (hub_layout.qwen_config("qwen3_vl", "4b"): 36 text
layers of width 2560, a 24-block vision tower of width 1024) with random weights, written in the hub's
own folder layout by hub_layout.write_checkpoint (bfloat16 safetensors, ~8.9 GB; nothing is
downloaded). The embedder is then built from that folder by exactly the code a training run uses
(train.build_embedder on TrainConfig(backbone=<folder>, recipe="paper")): AutoModel loading, the
`paper` recipe (pixel budget 224^2..256^2, LoRA r 8 with dropout 0.05, frozen vision tower), dtype
"auto" = bfloat16 on a GPU (float32 on a CPU), attention "sdpa". Random weights time the same as
trained ones: no operation here depends on the values.

What it times
-------------
Synthetic inputs of the paper's shape (no data set needed), b = 64 pairs per step (the authors'
per-GPU batch, train.py --batch_size):
  * target: a 640x480 photo through the backbone's processor at the recipe's pixel budget (the
    aspect ratio kept: 288 x 192 px -> 18 x 12 = 216 patches of 16 px -> 54 visual tokens after
    the 2 x 2 merge; the run reports both from what the processor made);
  * query kind "t2i": a text of --text-tokens words (FashionGen-like descriptions; the authors'
    chunk for t2i/FashionGen is 8), or "cir": one 640x480 photo plus a modification text of
    --mod-tokens words (FashionIQ; the authors' chunk 32). The words are drawn from the written
    tokenizer's one-token words, so a text of n words is n tokens, as common English words are
    in Qwen's own 151k vocabulary (the written tokenizer is a small BPE, hub_layout.build_tokenizer).
One step = what train.train_step does with a batch: reseed, train.gradcache_step (the paper's
positives="single" and per-chunk regulariser), the gradient norm (no clipping in `paper`), AdamW
(train.build_optimizer) and zero_grad. The batch's tensors are collated before the clock starts,
as the training loader does it during the previous step. For each (query kind, chunk size):
--warmup untimed steps, then --steps timed ones; the median is reported. Also measured:
  * peak memory: torch.cuda.max_memory_allocated over that configuration's steps (weights,
    optimizer state and activations); on a CPU the process's peak resident set (ru_maxrss), which
    includes building the model;
  * encode images/s: embedder.encode_images on --encode-images photos at evaluate.py's batch size
    (64), processor included, after one warm-up batch: the gallery-encoding speed of evaluation.

FLOPs and MFU (model FLOPs utilisation)
---------------------------------------
Matmul FLOPs only (norms, activations, rotary embeddings, softmax, the calibrator and the loss are
left out: together well under 1 % here), counted from the config and the real, unpadded lengths:

    text forward   F_t = sum_rows [ 2 (P_lin + P_lora) L_r  +  4 n_layers (H d) L_r^2 ]
    vision forward F_v = sum_images [ 2 P_patch n_i  +  2 P_merge n_i / m^2  +  4 depth W_v n_i^2 ]
    text backward  B_t = sum_rows [ 2 P_lin L_r  +  4 P_lora L_r  +  8 n_layers (H d) L_r^2 ]

    step = 2 (F_t + F_v) + B_t     (GradCache, more than one chunk: a no-grad forward of every
                                    chunk, then a forward with grad and a backward per chunk)
    step =   (F_t + F_v) + B_t     (one chunk: train.gradcache_step falls back to the plain path)

    MFU = step / (median step seconds x peak)

L_r real tokens of row r (its attention mask: text, template and visual tokens); P_lin the weights
of the text layers' seven projections (q, k, v, o, gate, up, down; 2 P_lin FLOPs per token, the
usual 2 x parameters x tokens); the embedding table is a lookup (0 FLOPs) and no LM head runs
(the embedding is a hidden state). Attention scores and their weighted sum are 4 (H d) L_r per token
and layer, H d = heads x head width, without halving for the causal mask (PaLM's convention,
Chowdhery et al. 2022, appendix B). Backward: every text weight is frozen except LoRA, so a frozen
projection computes only its input gradient (dX = dY W^T: 1 x its forward), LoRA both gradients
(2 x its forward, P_lora = r (in + out) per adapted projection), attention 2 x its forward. The
vision tower is frozen and its input needs no gradient, so it runs forward only (twice under
GradCache), and has no backward: P_patch the patch embedding and the blocks' weights (per patch
n_i of image i), P_merge the patch merger and the deepstack mergers (per merged token, m^2 = 4
patches), W_v the tower's width. The no-grad forward of GradCache is counted: it is work the method
needs, not an implementation's recomputation, so this MFU is the share of the peak doing the
method's own arithmetic. The peak: NVIDIA H200 bfloat16 dense tensor-core throughput, 989 TFLOP/s
(datasheet; --peak-tflops for another chip). A CPU run reports no MFU unless --peak-tflops is given.

Run it
------
    python benchmarks/paper_scale.py --size 4b --device cuda --out benchmarks/paper_scale.json
    python benchmarks/paper_scale.py --size test --device cpu     # the same code, tiny, seconds on a CPU
    python benchmarks/paper_scale.py --size 4b --device cuda --backbone-dir /data/q3vl4b-random
        # keep the ~9 GB random checkpoint, reused by the next run with the same --size and --seed

--size 4b is for a GPU: the bfloat16 weights alone take ~8.9 GB of its memory (the run prints each
configuration's peak), and writing the checkpoint needs ~18 GB of host memory for a moment
(write_checkpoint builds the model in float32 before casting it). Most of a run's wall time goes to
writing and loading that checkpoint; --backbone-dir keeps it for the next run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from support.errors import FlagError, run_cli  # noqa: E402  (standard library only: --help stays fast)

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 "with sparsity", half dense
PHOTO_SIZE = (640, 480)  # (width, height) of every synthetic photo: the "640x480 photo"
QUERY_KINDS = ("t2i", "cir")  # text only | one photo + a modification text
AUTHORS_CHUNK = {"t2i": "t2i/FashionGen", "cir": "cir/FashionIQ-Dress"}  # the sub-dataset each kind imitates
MARKER = "paper_scale_backbone.json"  # written into --backbone-dir once its checkpoint is complete


@dataclass
class BenchConfig:
    """One benchmark run; every CLI flag maps onto one field."""

    size: str = "4b"  # hub_layout size: "4b" = Qwen3-VL-4B-Instruct's shape; "test" = a few small layers
    device: str = "cuda"  # where the step runs; a CPU run prints that its figures are CPU figures
    batch: int = 64  # pairs per step: the authors' per-GPU batch (train.py --batch_size 64)
    chunks: tuple = (8, 32)  # GradCache chunk sizes timed: the authors' t2i/FashionGen (8) and FashionIQ (32)
    kinds: tuple = QUERY_KINDS  # query kinds timed at every chunk size
    text_tokens: int = 40  # words of a t2i query text (one token each)
    mod_tokens: int = 12  # words of a cir modification text
    warmup: int = 1  # untimed steps per configuration (allocator, kernels, AdamW's state)
    steps: int = 3  # timed steps per configuration; the median is reported
    encode_images: int = 256  # photos for the encode throughput (0 = skip)
    encode_batch: int = 64  # evaluate.py's batch size
    seed: int = 0  # random weights, photos and words
    peak_tflops: Optional[float] = None  # None: 989 (H200 bf16 dense) on CUDA, no MFU on a CPU
    backbone_dir: str = ""  # where the random hub-layout checkpoint goes ("" = a temporary folder)


# =================================================================================================
# FLOPs: the counts of the module docstring, from the config alone
# =================================================================================================

@dataclass
class FlopCounts:
    """The parameter counts the FLOP equations use, read off a Qwen3-VL config (weights only)."""

    text_layers: int  # n_layers
    attn_width: int  # H d: query heads x head width (4096 in the 4B, wider than its hidden 2560)
    p_lin: int  # P_lin: weights of the seven projections of all text layers
    p_lora: int  # P_lora: r (in + out) summed over every adapted projection
    vision_depth: int  # blocks of the vision tower
    vision_width: int  # W_v
    p_patch: int  # P_patch: patch embedding + the blocks' linears (applied to every patch)
    p_merge: int  # P_merge: the patch merger + the deepstack mergers (applied to every merged token)
    merge: int  # m: patches merged per side (m^2 patches -> one visual token)


def flop_counts(config, lora_r: int) -> FlopCounts:
    """FlopCounts of a transformers Qwen3VLConfig with LoRA of rank lora_r on all seven projections."""
    t, v = config.text_config, config.vision_config
    if config.model_type != "qwen3_vl":
        raise ValueError(f"the FLOP count is written for qwen3_vl, not {config.model_type}")
    h, hd, kv, inter = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, \
        t.intermediate_size
    # (in, out) of q, k, v, o, gate, up, down in one text layer
    shapes = [(h, hd), (h, kv), (h, kv), (hd, h), (h, inter), (h, inter), (inter, h)]
    p_lin = t.num_hidden_layers * sum(i * o for i, o in shapes)  # P_lin
    p_lora = t.num_hidden_layers * sum(lora_r * (i + o) for i, o in shapes)  # P_lora
    w, m = v.hidden_size, v.spatial_merge_size
    patch_embed = w * v.in_channels * v.temporal_patch_size * v.patch_size ** 2  # Conv3d over one patch
    block = 3 * w * w + w * w + 2 * w * v.intermediate_size  # qkv, proj, fc1, fc2
    merger = (w * m * m) ** 2 + w * m * m * v.out_hidden_size  # fc1 (4W -> 4W), fc2 (4W -> text width)
    return FlopCounts(text_layers=t.num_hidden_layers, attn_width=hd, p_lin=p_lin, p_lora=p_lora,
                      vision_depth=v.depth, vision_width=w, p_patch=patch_embed + v.depth * block,
                      p_merge=merger * (1 + len(v.deepstack_visual_indexes)), merge=m)


def step_flops(c: FlopCounts, lengths: list, patches: list, n_chunks: int) -> dict:
    """FLOPs of one step (module docstring): lengths = L_r of every row (queries and targets),
    patches = n_i of every image of the batch, n_chunks = GradCache chunks of the step."""
    lin = sum(2 * (c.p_lin + c.p_lora) * L for L in lengths)  # 2 (P_lin + P_lora) L_r
    attn = sum(4 * c.text_layers * c.attn_width * L * L for L in lengths)  # 4 n_layers (H d) L_r^2
    text_fwd = lin + attn  # F_t
    vision_fwd = sum(2 * c.p_patch * n + 2 * c.p_merge * n // c.merge ** 2
                     + 4 * c.vision_depth * c.vision_width * n * n for n in patches)  # F_v
    text_bwd = sum(2 * c.p_lin * L + 4 * c.p_lora * L for L in lengths) + 2 * attn  # B_t
    forwards = 2 if n_chunks > 1 else 1  # GradCache's no-grad pass + the pass with grad
    return {"text_forward": text_fwd, "vision_forward": vision_fwd, "text_backward": text_bwd,
            "forwards": forwards, "total": forwards * (text_fwd + vision_fwd) + text_bwd}


# =================================================================================================
# The synthetic batch
# =================================================================================================

def photos(n: int, seed: int) -> list:
    """n distinct 640x480 RGB photos (random pixels: the processor's work does not depend on them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = PHOTO_SIZE
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]  # (480, 640, 3) each


def one_token_words(tokenizer) -> list:
    """Alphabetic words of 3+ letters that the tokenizer writes as one token after a space, sorted."""
    words = []
    for piece in tokenizer.get_vocab():
        word = piece[1:] if piece.startswith("Ġ") else ""  # byte-level BPE writes a leading space as Ġ
        if len(word) >= 3 and word.isascii() and word.isalpha():
            if len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1:
                words.append(word)
    if len(words) < 20:
        raise ValueError(f"the tokenizer has only {len(words)} one-token words; cannot build the texts")
    return sorted(words)


def make_batch(embedder, kind: str, batch: int, cfg: BenchConfig, step_seed: int = 0):
    """A train.Batch of `batch` synthetic pairs of query kind `kind`, its tensors already collated."""
    import data
    import train

    rng = random.Random(cfg.seed * 1000 + step_seed)
    words = one_token_words(embedder.tokenizer)
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731  (n one-token words)
    targets = photos(batch, cfg.seed + 1)
    if kind == "t2i":
        queries = [data.Query(instruction=text(cfg.text_tokens)) for _ in range(batch)]
    elif kind == "cir":
        refs = photos(batch, cfg.seed + 2)
        queries = [data.Query(instruction=text(cfg.mod_tokens), images=[im]) for im in refs]
    else:
        raise ValueError(f"unknown query kind {kind!r}; expected one of {QUERY_KINDS}")
    keys = [f"synthetic/{kind}/{i}.jpg" for i in range(batch)]  # distinct targets
    inputs = (embedder.collate_queries(queries), embedder.collate_images(targets))  # the loader's work
    return train.Batch(subset=AUTHORS_CHUNK[kind], queries=queries, images=targets, keys=keys, inputs=inputs)


def batch_shape(batch) -> dict:
    """Row lengths L_r (attention masks) and image patch counts n_i of a collated batch."""
    lengths, patches = [], []
    for x in batch.inputs:  # (query inputs, target inputs)
        lengths += x.attention_mask.sum(dim=1).tolist()  # (b,) real tokens per row
        if x.image_grid_thw is not None:
            patches += x.image_grid_thw.prod(dim=1).tolist()  # (n_img,) t * h * w patches per image
    return {"lengths": [int(L) for L in lengths], "patches": [int(n) for n in patches]}


# =================================================================================================
# Build, step, measure
# =================================================================================================

def build(cfg: BenchConfig):
    """(embedder, train config, model config, checkpoint folder, whether the folder is temporary)."""
    import torch

    from support import hub_layout
    import train

    qcfg = hub_layout.qwen_config("qwen3_vl", cfg.size)
    temporary = not cfg.backbone_dir
    folder = Path(cfg.backbone_dir or tempfile.mkdtemp(prefix="paper_scale_"))
    want = {"size": cfg.size, "seed": cfg.seed, "arch": "qwen3_vl"}
    try:
        if _marker(folder) != want:  # no complete checkpoint of this size and seed there yet
            if folder.is_dir() and any(folder.iterdir()) and not temporary:
                raise FlagError(f"--backbone-dir {folder}: not empty and not a checkpoint this benchmark wrote "
                                f"for --size {cfg.size} --seed {cfg.seed}; give an empty or new folder")
            dtype = torch.bfloat16 if cfg.size == "4b" else torch.float32  # the hub ships the 4B in bfloat16
            t0 = time.perf_counter()
            hub_layout.write_checkpoint(folder, qcfg, dtype=dtype, seed=cfg.seed)
            (folder / MARKER).write_text(json.dumps(want))  # last: a half-written folder has no marker
            print(f"wrote the random {cfg.size} checkpoint to {folder} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        tcfg = train.TrainConfig(backbone=str(folder), recipe="paper", batch_size=cfg.batch, device=cfg.device,
                                 seed=cfg.seed).resolved()
        embedder = train.build_embedder(tcfg, cfg.device)
    except BaseException:
        if temporary:  # a failed build must not leave ~9 GB behind in the temporary folder
            shutil.rmtree(folder, ignore_errors=True)
        raise
    embedder.train()  # LoRA dropout on, as in training
    return embedder, tcfg, qcfg, folder, temporary


def _marker(folder: Path) -> Optional[dict]:
    """The settings a complete checkpoint in `folder` was written with, or None (none, or unreadable)."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def sync(device: str) -> None:
    """Wait for queued GPU work, so a clock read after it measures the work."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_once(embedder, optimizer, params, batch, chunk: int, tcfg, step: int) -> float:
    """One training step as train.train_step computes it (no loader, sampler or log); its loss."""
    import torch

    from support import plumbing
    import train

    torch.manual_seed(plumbing.mix_seed(tcfg.seed, step, 0))  # dropout masks of this step
    out = train.gradcache_step(embedder, batch, tcfg.temperature, chunk_size=chunk, positives=tcfg.positives,
                               reg_per_chunk=tcfg.reg_per_chunk)
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))  # no clipping
    if not math.isfinite(norm):
        raise FloatingPointError(f"gradient norm {norm} at step {step}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss


def peak_memory(device: str) -> dict:
    """The memory figure of the device: CUDA peak allocated since the last reset, or the process's RSS peak."""
    import torch

    if device.startswith("cuda"):
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "memory_kind": "cuda max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_memory_bytes": int(rss), "memory_kind": "process peak RSS (model build included)"}


def measure_step(embedder, tcfg, counts: FlopCounts, kind: str, chunk: int, cfg: BenchConfig, peak: Optional[float]):
    """Warm-up and timed steps of one (query kind, chunk size); returns its figures."""
    import torch

    import train
    from support.plumbing import DistInfo

    batch = make_batch(embedder, kind, cfg.batch, cfg)
    shape = batch_shape(batch)
    plan = train.Plan(total=cfg.warmup + cfg.steps, steps_per_epoch=cfg.warmup + cfg.steps, ggas_warmup=0,
                      lr_warmup=0, per_rank=cfg.batch)
    _, params, optimizer, _ = train.build_optimizer(embedder, tcfg, plan, DistInfo())  # one process
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(cfg.warmup + cfg.steps):
        sync(cfg.device)
        t0 = time.perf_counter()
        losses.append(train_once(embedder, optimizer, params, batch, chunk, tcfg, step))
        sync(cfg.device)
        if step >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    n_chunks = -(-cfg.batch // chunk)  # ceil(b / chunk)
    fl = step_flops(counts, shape["lengths"], shape["patches"], n_chunks)
    sec = statistics.median(times)
    visual = [n // counts.merge ** 2 for n in shape["patches"]]  # visual tokens per image
    row = {"kind": kind, "chunk": chunk, "chunks_per_step": n_chunks, "authors_chunk_of_kind":
           _authors_chunk(kind), "batch": cfg.batch, "step_seconds": times, "step_seconds_median": sec,
           "tokens_per_step": int(sum(shape["lengths"])), "images_per_step": len(shape["patches"]),
           "visual_tokens_per_step": int(sum(visual)),
           "patches_per_photo": shape["patches"][-1], "visual_tokens_per_photo": visual[-1],  # a target photo
           "flops_per_step": fl, "achieved_tflops": fl["total"] / sec / 1e12, "losses": losses}
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    row.update(peak_memory(cfg.device))
    del optimizer, params
    return row


def _authors_chunk(kind: str) -> int:
    """The authors' GradCache chunk for the sub-dataset a query kind imitates (recipes.CHUNK_SIZES)."""
    from support import recipes

    return recipes.chunk_size_for(AUTHORS_CHUNK[kind], -1)


def measure_encode(embedder, cfg: BenchConfig) -> dict:
    """Gallery photos per second through embedder.encode_images, after one warm-up batch."""
    if cfg.encode_images <= 0:
        return {}
    pool = photos(min(cfg.encode_images, 64), cfg.seed + 3)  # distinct pixels; repeated beyond 64
    items = [pool[i % len(pool)] for i in range(cfg.encode_images)]
    embedder.encode_images(items[:cfg.encode_batch], batch_size=cfg.encode_batch)  # warm-up
    sync(cfg.device)
    t0 = time.perf_counter()
    out = embedder.encode_images(items, batch_size=cfg.encode_batch)  # (N, D) float32 on the CPU
    sec = time.perf_counter() - t0
    embedder.train()  # encode_images restores the mode it found; say it anyway for the next step
    return {"encode_images": len(items), "encode_batch": cfg.encode_batch, "encode_seconds": sec,
            "encode_images_per_s": len(items) / sec, "encode_dim": int(out.shape[1])}


def run(cfg: BenchConfig, embedder=None, tcfg=None, qcfg=None) -> dict:
    """Every measurement of the module docstring; builds the embedder unless one is given."""
    import torch

    folder, temporary = None, False
    if embedder is None:
        embedder, tcfg, qcfg, folder, temporary = build(cfg)
    try:
        counts = flop_counts(qcfg, embedder.config.lora_r)
        peak = cfg.peak_tflops if cfg.peak_tflops else (H200_BF16_DENSE_TFLOPS if cfg.device.startswith("cuda") else None)
        res = {"header": header(cfg, embedder), "flop_counts": dataclasses.asdict(counts),
               "peak_tflops": peak, "params": embedder.param_counts(), "rows": []}
        res["weights_memory_bytes"] = int(torch.cuda.memory_allocated()) if cfg.device.startswith("cuda") else None
        for kind in cfg.kinds:
            for chunk in cfg.chunks:
                row = measure_step(embedder, tcfg, counts, kind, chunk, cfg, peak)
                print(row_line(row), flush=True)
                res["rows"].append(row)
        res["encode"] = measure_encode(embedder, cfg)
        return res
    finally:
        if temporary and folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


# =================================================================================================
# Reporting
# =================================================================================================

def header(cfg: BenchConfig, embedder) -> dict:
    """Date, machine, commit, versions and device: what a reader needs to compare two results."""
    import peft
    import torch
    import transformers

    from support import plumbing

    gpu = torch.cuda.get_device_name(torch.device(cfg.device)) if cfg.device.startswith("cuda") else None
    m = plumbing.machine_info(REPO)  # CPU, cores, versions, date and commit ("+dirty": tracked files changed)
    commit = m["commit"].removesuffix("+dirty") if m["commit"] else None
    dirty = m["commit"].endswith("+dirty") if m["commit"] else None
    return {"date": m["date"], "commit": commit,
            "worktree_dirty": dirty, "machine": {"cpu_model": m["cpu_model"], "cores": m["cores"], "gpu": gpu,
                                                 "platform": m["platform"]},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
            "device": cfg.device, "size": cfg.size, "dtype": str(embedder.model_dtype).replace("torch.", ""),
            "attn_implementation": embedder.config.attn_implementation, "recipe": "paper",
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}}


def flops_text(x: float) -> str:
    """A FLOP count with its unit: TFLOP from 10^12 on, GFLOP below (the test size's counts)."""
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e12 else f"{x / 1e9:.2f} GFLOP"


def row_line(row: dict) -> str:
    """One configuration as a line of text."""
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f} %"
    n = row["chunks_per_step"]
    return (f"{row['kind']:>4} chunk {row['chunk']:>3} ({n} chunk{'s' if n > 1 else ''}): step "
            f"{row['step_seconds_median']:.3f} s, {row['tokens_per_step']} tokens, "
            f"{flops_text(row['flops_per_step']['total'])} -> {flops_text(row['achieved_tflops'] * 1e12)}/s, "
            f"MFU {mfu}, peak memory {row['peak_memory_bytes'] / 2 ** 30:.2f} GiB")


def table(res: dict) -> str:
    """The markdown table of every configuration, plus the encode line."""
    lines = ["| query | chunk | step s (median) | tokens / step | visual tokens | FLOP / step | FLOP/s | MFU "
             "| peak memory GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        mark = " (authors')" if r["chunk"] == r["authors_chunk_of_kind"] else ""
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        lines.append(f"| {r['kind']} | {r['chunk']}{mark} | {r['step_seconds_median']:.3f} | {r['tokens_per_step']} "
                     f"| {r['visual_tokens_per_step']} | {flops_text(r['flops_per_step']['total'])} "
                     f"| {flops_text(r['achieved_tflops'] * 1e12)}/s | {mfu} | {r['peak_memory_bytes'] / 2 ** 30:.2f} |")
    e = res.get("encode") or {}
    if e:
        lines.append(f"\nencode_images: {e['encode_images_per_s']:.1f} images/s ({e['encode_images']} photos "
                     f"640x480, batch {e['encode_batch']}, processor included)")
    return "\n".join(lines)


def cpu_banner(device: str) -> str:
    """The loud line of a CPU run: its numbers must never be read as GPU figures."""
    return ("*** CPU RUN: every time, throughput and memory figure below was measured on a CPU; "
            "these are NOT GPU figures ***" if not device.startswith("cuda") else "")


# =================================================================================================
# Command line
# =================================================================================================

def build_parser() -> argparse.ArgumentParser:
    """The flags (BenchConfig's fields); defaults per --size are filled in by parse_flags."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", default="4b", choices=["4b", "test"], help="4b: Qwen3-VL-4B-Instruct's shape; test: tiny")
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda if there is one)")
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (default 64; test: 8)")
    ap.add_argument("--chunks", default=None, help="comma-separated GradCache chunk sizes (default 8,32; test: 2,8)")
    ap.add_argument("--kinds", default=",".join(QUERY_KINDS), help="query kinds: t2i, cir")
    ap.add_argument("--text-tokens", type=int, default=40, help="words (= tokens) of a t2i query text")
    ap.add_argument("--mod-tokens", type=int, default=12, help="words (= tokens) of a cir modification text")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 3; test: 2)")
    ap.add_argument("--encode-images", type=int, default=None, help="photos to encode (default 256; test: 16; 0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s for the MFU (default: 989, H200 bf16, on CUDA; none on a CPU)")
    ap.add_argument("--backbone-dir", default="", help="keep the random checkpoint here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (e.g. benchmarks/paper_scale.json)")
    return ap


SIZE_DEFAULTS = {"4b": dict(batch=64, chunks="8,32", steps=3, encode_images=256),
                 "test": dict(batch=8, chunks="2,8", steps=2, encode_images=16)}


def parse_flags(argv=None) -> tuple[BenchConfig, Optional[str]]:
    """BenchConfig and --out from the command line; a bad value is a FlagError naming its flag."""
    args = build_parser().parse_args(argv)
    for k, v in SIZE_DEFAULTS[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        chunks = tuple(int(c) for c in str(args.chunks).split(",") if c.strip())
    except ValueError:
        raise FlagError(f"--chunks {args.chunks!r}: comma-separated positive integers (e.g. 8,32)") from None
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    checks = {"--batch": (args.batch, args.batch >= 1, "must be >= 1"),
              "--chunks": (args.chunks, bool(chunks) and all(c >= 1 for c in chunks), "positive integers"),
              "--kinds": (args.kinds, bool(kinds) and all(k in QUERY_KINDS for k in kinds), f"among {QUERY_KINDS}"),
              "--text-tokens": (args.text_tokens, args.text_tokens >= 1, "must be >= 1"),
              "--mod-tokens": (args.mod_tokens, args.mod_tokens >= 1, "must be >= 1"),
              "--warmup": (args.warmup, args.warmup >= 0, "must be >= 0"),
              "--steps": (args.steps, args.steps >= 1, "must be >= 1"),
              "--encode-images": (args.encode_images, args.encode_images >= 0, "must be >= 0"),
              "--peak-tflops": (args.peak_tflops, args.peak_tflops is None or args.peak_tflops > 0, "must be > 0")}
    for flag, (value, ok, need) in checks.items():
        if not ok:
            raise FlagError(f"{flag} {value!r}: {need}")
    from support import plumbing  # before torch: it sets OpenMP's wait policy

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    plumbing.check_device("--device", device)
    if args.size == "4b" and not device.startswith("cuda"):
        raise FlagError(f"--size 4b --device {device}: the full-size benchmark is for a GPU (--device cuda); "
                        "--size test runs the same code at a tiny size on a CPU")
    if args.out:
        plumbing.check_writable("--out", args.out, folder=False)
    if args.backbone_dir:
        plumbing.check_writable("--backbone-dir", args.backbone_dir)
    cfg = BenchConfig(size=args.size, device=device, batch=args.batch, chunks=chunks, kinds=kinds,
                      text_tokens=args.text_tokens, mod_tokens=args.mod_tokens, warmup=args.warmup,
                      steps=args.steps, encode_images=args.encode_images, seed=args.seed,
                      peak_tflops=args.peak_tflops, backbone_dir=args.backbone_dir)
    return cfg, args.out


def main(argv=None) -> int:
    """The command line, through errors.run_cli: a bad flag is one `error:` line and exit 1."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    cfg, out = parse_flags(argv)
    banner = cpu_banner(cfg.device)
    if banner:
        print(banner, flush=True)
    res = run(cfg)
    h = res["header"]
    print(f"\nQwen3-VL {cfg.size} (random weights, {h['dtype']}, {h['attn_implementation']}) on {cfg.device}"
          f"{' (' + h['machine']['gpu'] + ')' if h['machine']['gpu'] else ''}; batch {cfg.batch}; "
          f"{res['params']['total'] / 1e9:.3f} B parameters, {res['params']['trainable'] / 1e6:.1f} M trainable; "
          f"{h['date']}, commit {h['commit']}")
    print(table(res))
    if banner:
        print(banner)
    if out:
        from support import plumbing

        plumbing.atomic_write(Path(out), json.dumps(res, indent=1, allow_nan=False) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
