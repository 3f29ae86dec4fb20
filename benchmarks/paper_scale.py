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
  * query kind "t2i": a text only (the authors' chunk for t2i/FashionGen is 8), or "cir": one 640x480
    photo plus a text (FashionIQ; the authors' chunk 32). Each text is as long, in Qwen's own tokens,
    as the median real U-FIRE instruction (benchmarks/prompt_lengths.json: 15 tokens, the 1,000 real
    instructions of the OOD compatible-item task; --text-tokens / --mod-tokens override): words drawn
    from Qwen's one-token words (the checkpoint carries Qwen's real tokenizer, hub_layout.build_tokenizer),
    so a text of n words is n tokens. The real FashionGen / FashionIQ texts are not available here.
One step = what train.train_step does with a batch: reseed, train.gradcache_step (the paper's
positives="single" and per-chunk regulariser), the gradient norm (no clipping in `paper`), AdamW
(train.build_optimizer) and zero_grad. The batch's tensors are collated before the clock starts,
as the training loader does it during the previous step. For each (query kind, chunk size):
--warmup untimed steps, then --steps timed ones; the median is reported. Also measured:
  * peak memory: torch.cuda.max_memory_allocated over that configuration's steps (weights,
    optimizer state and activations); on a CPU what the steps allocate (the highest anonymous memory,
    RssAnon sampled every ~1 ms, above its level before them: "step_memory_bytes") and that on top of
    the resident set before them (VmRSS: "rss_before_steps_bytes"; the sum: "peak_memory_bytes";
    support.peak_memory.CpuPeak, "memory_kind" says how it was measured);
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

--size 4b on a GPU: the bfloat16 weights take ~8.9 GB of its memory (the run prints each
configuration's peak); writing the checkpoint needs ~9 GB of host memory (drawn in bfloat16 directly).
Most of a GPU run's wall time goes to writing and loading that checkpoint; --backbone-dir keeps it.

--size 4b on a CPU (bfloat16, all 36 layers; fits 24 GiB): the full shape's trainable parameters
(counted by group and derived from the config), one gallery encode and, per chunk size, in a process of
its own, the memory one chunk's forward with gradients holds on top of the loaded model:

    python benchmarks/paper_scale.py --size 4b --device cpu --kinds cir --chunks 1,2,4,8 --forward-only \
        --warmup 0 --steps 1 --encode-images 4 --encode-batch 4 --isolate --time-box 1200 \
        --backbone-dir /data/q3vl4b-random --out benchmarks/paper_scale_4b_cpu.json

--forward-only, because a CPU without bfloat16 matrix units (AVX2 only, like the AMD EPYC here) runs the
backward's input-gradient products (dY W through every frozen projection) in torch's reference GEMM,
~0.3 GFLOP/s per core against ~8 for the forward's products: a full step of one 4B pair takes about an
hour there. On a CPU with AVX-512 bfloat16 or AMX, drop --forward-only and give --two-chunks (each
batch = its chunk + 1 pairs: a real GradCache step, a full chunk and a remainder). --isolate also
projects, from the measured chunk sizes, the GPU memory of batch 64 under the authors' chunk table
(project_memory).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import random
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
from support.peak_memory import CpuPeak  # noqa: E402  (standard library only too)

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 "with sparsity", half dense
PHOTO_SIZE = (640, 480)  # (width, height) of every synthetic photo: the "640x480 photo"
QUERY_KINDS = ("t2i", "cir")  # text only | one photo + a modification text
AUTHORS_CHUNK = {"t2i": "t2i/FashionGen", "cir": "cir/FashionIQ-Dress"}  # the sub-dataset each kind imitates
MARKER = "paper_scale_backbone.json"  # written into --backbone-dir once its checkpoint is complete
# Real prompt lengths (benchmarks/prompt_lengths.py): the query texts are built to the real median.
PROMPT_LENGTHS = REPO / "benchmarks" / "prompt_lengths.json"


def real_text_tokens() -> dict:
    """Median and max Qwen tokens of the real U-FIRE instructions (benchmarks/prompt_lengths.json)."""
    try:
        real = json.loads(PROMPT_LENGTHS.read_text(encoding="utf-8"))["qwen"]["real"]["instruction_text"]
        return {"median": int(round(real["median"])), "max": int(real["max"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FlagError(f"{PROMPT_LENGTHS}: cannot read the real prompt lengths ({e}); run "
                        f"`python benchmarks/prompt_lengths.py --out {PROMPT_LENGTHS.relative_to(REPO)}` "
                        f"or give --text-tokens and --mod-tokens") from None


@dataclass
class BenchConfig:
    """One benchmark run; every CLI flag maps onto one field."""

    size: str = "4b"  # hub_layout size: "4b" = Qwen3-VL-4B-Instruct's shape; "test" = a few small layers
    device: str = "cuda"  # where the step runs; a CPU run prints that its figures are CPU figures
    batch: int = 64  # pairs per step: the authors' per-GPU batch (train.py --batch_size 64)
    chunks: tuple = (8, 32)  # GradCache chunk sizes timed: the authors' t2i/FashionGen (8) and FashionIQ (32)
    kinds: tuple = QUERY_KINDS  # query kinds timed at every chunk size
    text_tokens: int = 0  # tokens of a t2i query text (0: the real median, benchmarks/prompt_lengths.json)
    mod_tokens: int = 0  # tokens of a cir instruction (0: the real median, benchmarks/prompt_lengths.json)
    warmup: int = 1  # untimed steps per configuration (allocator, kernels, AdamW's state)
    steps: int = 3  # timed steps per configuration; the median is reported
    encode_images: int = 256  # photos for the encode throughput (0 = skip)
    encode_batch: int = 64  # evaluate.py's batch size
    seed: int = 0  # random weights, photos and words
    peak_tflops: Optional[float] = None  # None: 989 (H200 bf16 dense) on CUDA, no MFU on a CPU
    backbone_dir: str = ""  # where the random hub-layout checkpoint goes ("" = a temporary folder)
    dtype: str = "auto"  # the backbone's weights: auto = bfloat16 on a GPU, float32 on a CPU; or bfloat16 | float32
    two_chunks: bool = False  # each configuration's batch = its chunk + 1: the smallest real GradCache step
    isolate: bool = False  # each chunk size in its own process (a clean memory peak; an OOM ends only that one)
    time_box: int = 0  # seconds allowed to each isolated process (0 = no limit)
    forward_only: bool = False  # measure one chunk's forward WITH gradients kept, no backward (a CPU's memory probe)


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
    """Alphabetic words of 3+ letters that the tokenizer writes as one token, after a space or not; sorted."""
    words = []
    for piece in tokenizer.get_vocab():
        word = piece[1:] if piece.startswith("Ġ") else ""  # byte-level BPE writes a leading space as Ġ
        if len(word) >= 3 and word.isascii() and word.isalpha():
            # one token after a space and at the start of a text (a text's first word has no space)
            if all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in (" " + word, word)):
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
    lengths = real_text_tokens() if not (cfg.text_tokens and cfg.mod_tokens) else {}
    if kind == "t2i":
        n = cfg.text_tokens or lengths["median"]  # the real instructions' median, unless given
        queries = [data.Query(instruction=text(n)) for _ in range(batch)]
    elif kind == "cir":
        refs = photos(batch, cfg.seed + 2)
        n = cfg.mod_tokens or lengths["median"]
        queries = [data.Query(instruction=text(n), images=[im]) for im in refs]
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
    from support import hub_layout
    import train

    qcfg = hub_layout.qwen_config("qwen3_vl", cfg.size)
    temporary = not cfg.backbone_dir
    folder = Path(cfg.backbone_dir or tempfile.mkdtemp(prefix="paper_scale_"))
    try:
        ensure_checkpoint(cfg, folder, qcfg, temporary)  # written once; reused with the same --size / --seed
        tcfg = train.TrainConfig(backbone=str(folder), recipe="paper", batch_size=cfg.batch, device=cfg.device,
                                 seed=cfg.seed).resolved()
        if cfg.dtype == "auto":
            embedder = train.build_embedder(tcfg, cfg.device)
        else:  # train.build_embedder's embedder with the weights in an explicit dtype (bfloat16 on a CPU)
            from model import EmbedderConfig, FashionLensEmbedder

            embedder = FashionLensEmbedder(EmbedderConfig(backbone=tcfg.backbone, seed=tcfg.seed,
                                                          calibrator=tcfg.calibrator, device=cfg.device,
                                                          dtype=cfg.dtype, **tcfg.embedder_fields()))
    except BaseException:
        if temporary:  # a failed build must not leave ~9 GB behind in the temporary folder
            shutil.rmtree(folder, ignore_errors=True)
        raise
    embedder.train()  # LoRA dropout on, as in training
    return embedder, tcfg, qcfg, folder, temporary


def ensure_checkpoint(cfg: BenchConfig, folder: Path, qcfg, temporary: bool) -> None:
    """Write the random hub-layout checkpoint of --size / --seed into `folder`, unless a complete one is there."""
    import torch

    from support import hub_layout

    want = {"size": cfg.size, "seed": cfg.seed, "arch": "qwen3_vl"}
    if _marker(folder) == want:
        return
    if folder.is_dir() and any(folder.iterdir()) and not temporary:
        raise FlagError(f"--backbone-dir {folder}: not empty and not a checkpoint this benchmark wrote "
                        f"for --size {cfg.size} --seed {cfg.seed}; give an empty or new folder")
    dtype = torch.bfloat16 if cfg.size == "4b" else torch.float32  # the hub ships the 4B in bfloat16
    # The random 4B is drawn in bfloat16 directly (hub_layout.write_checkpoint): ~9 GB of host memory.
    t0 = time.perf_counter()
    hub_layout.write_checkpoint(folder, qcfg or hub_layout.qwen_config("qwen3_vl", cfg.size), dtype=dtype,
                                seed=cfg.seed)
    (folder / MARKER).write_text(json.dumps(want))  # last: a half-written folder has no marker
    print(f"wrote the random {cfg.size} checkpoint to {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)


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


def page_in(module) -> None:
    """Read every weight once. transformers maps a safetensors checkpoint into memory lazily, so a weight
    joins the resident set only when first touched: without this the first step's "own" memory would
    include the ~9 GB of weights it pages in."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.sum()  # touches every page of p; the scalar is dropped


def host_peak(device: str):
    """A CpuPeak (support.peak_memory) around the steps on a CPU; on a GPU nothing (CUDA keeps its own peak)."""
    return contextlib.nullcontext() if device.startswith("cuda") else CpuPeak()


def memory_row(device: str, cpu: Optional[CpuPeak]) -> dict:
    """The memory figures of a row: CUDA's peak allocated since the last reset; on a CPU the resident set
    before the steps plus what they allocated at their highest (CpuPeak), and that share on its own."""
    import torch

    if device.startswith("cuda"):
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "memory_kind": "cuda max_memory_allocated"}
    row = {"peak_memory_bytes": cpu.peak_bytes, "memory_kind": cpu.kind}
    if cpu.baseline_bytes is not None:  # not with ru_maxrss (no /proc): a lifetime peak, model build included
        row["rss_before_steps_bytes"] = cpu.baseline_bytes
        row["step_memory_bytes"] = cpu.step_bytes  # activations, gradients, AdamW state, cached reps
    return row


def measure_step(embedder, tcfg, counts: FlopCounts, kind: str, chunk: int, cfg: BenchConfig, peak: Optional[float]):
    """Warm-up and timed steps of one (query kind, chunk size); returns its figures."""
    import torch

    import train
    from support.plumbing import DistInfo

    if cfg.forward_only:
        return measure_forward(embedder, counts, kind, chunk, cfg)
    b = chunk + 1 if cfg.two_chunks else cfg.batch  # --two-chunks: one full chunk + a remainder of one pair
    batch = make_batch(embedder, kind, b, cfg)
    shape = batch_shape(batch)
    plan = train.Plan(total=cfg.warmup + cfg.steps, steps_per_epoch=cfg.warmup + cfg.steps, ggas_warmup=0,
                      lr_warmup=0, per_rank=b)
    _, params, optimizer, _ = train.build_optimizer(embedder, tcfg, plan, DistInfo())  # one process
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        page_in(embedder)  # the weights resident before the baseline is read
    times, losses = [], []
    with host_peak(cfg.device) as cpu:
        for step in range(cfg.warmup + cfg.steps):
            sync(cfg.device)
            t0 = time.perf_counter()
            losses.append(train_once(embedder, optimizer, params, batch, chunk, tcfg, step))
            sync(cfg.device)
            if step >= cfg.warmup:
                times.append(time.perf_counter() - t0)
    n_chunks = -(-b // chunk)  # ceil(b / chunk)
    fl = step_flops(counts, shape["lengths"], shape["patches"], n_chunks)
    sec = statistics.median(times)
    visual = [n // counts.merge ** 2 for n in shape["patches"]]  # visual tokens per image
    row = {"kind": kind, "chunk": chunk, "chunks_per_step": n_chunks, "authors_chunk_of_kind":
           _authors_chunk(kind), "batch": b, "step_seconds": times, "step_seconds_median": sec,
           "tokens_per_step": int(sum(shape["lengths"])), "images_per_step": len(shape["patches"]),
           "visual_tokens_per_step": int(sum(visual)),
           "patches_per_photo": shape["patches"][-1], "visual_tokens_per_photo": visual[-1],  # a target photo
           "flops_per_step": fl, "achieved_tflops": fl["total"] / sec / 1e12, "losses": losses}
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    row.update(memory_row(cfg.device, cpu))
    del optimizer, params
    return row


def measure_forward(embedder, counts: FlopCounts, kind: str, chunk: int, cfg: BenchConfig) -> dict:
    """--forward-only: one chunk of `chunk` pairs through the model with gradients on (what GradCache's
    pass with grad holds for its backward), the memory it holds and its time; no backward, no update.

    For a CPU without bfloat16 matrix units: there torch runs the backward's input-gradient products
    (dY W on a frozen weight) in its reference GEMM, ~0.3 GFLOP/s per core in bfloat16, so a full step of
    one 4B pair takes about an hour, while this forward runs at ~8 GFLOP/s per core. The backward's own
    buffers (each layer's gradients while it runs) come on top of the memory measured here."""
    import torch

    from support import plumbing

    batch = make_batch(embedder, kind, chunk, cfg)
    shape = batch_shape(batch)
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        page_in(embedder)  # the weights resident before the baseline is read
    torch.manual_seed(plumbing.mix_seed(cfg.seed, 0, 0))  # this forward's dropout masks
    with host_peak(cfg.device) as cpu:
        sync(cfg.device)
        t0 = time.perf_counter()
        out = embedder(queries=batch.inputs[0], images=batch.inputs[1])  # (chunk, D) q and t, graph kept
        held = (out["q"].float() * out["t"].float()).sum() + out["reg"].float()  # a scalar on the whole graph
        sync(cfg.device)
        sec = time.perf_counter() - t0
    fl = step_flops(counts, shape["lengths"], shape["patches"], n_chunks=1)
    forward = fl["text_forward"] + fl["vision_forward"]
    visual = [n // counts.merge ** 2 for n in shape["patches"]]
    row = {"kind": kind, "chunk": chunk, "chunks_per_step": 1, "authors_chunk_of_kind": _authors_chunk(kind),
           "batch": chunk, "mode": "forward with gradients kept (no backward)", "step_seconds": [sec],
           "step_seconds_median": sec, "tokens_per_step": int(sum(shape["lengths"])),
           "images_per_step": len(shape["patches"]), "visual_tokens_per_step": int(sum(visual)),
           "patches_per_photo": shape["patches"][-1], "visual_tokens_per_photo": visual[-1],
           "flops_per_step": {**fl, "total": forward, "forwards": 1, "text_backward": 0},
           "achieved_tflops": forward / sec / 1e12, "losses": [float(held.detach())], "mfu": None}
    row.update(memory_row(cfg.device, cpu))
    del out, held
    return row


def trainable_groups(embedder, qcfg) -> dict:
    """Trainable parameters by group, counted on the built embedder and derived from the config alone:
    LoRA r (in + out) per adapted projection (FlopCounts.p_lora), the calibrator's hyper-network
    D -> H (+ LayerNorm) -> 2 D r + 1 (calibrator.py), the two summary tokens 2 D; they must agree."""
    named = [(n, p) for n, p in embedder.named_parameters() if p.requires_grad]
    got = {"lora": sum(p.numel() for n, p in named if "lora_" in n),
           "calibrator": sum(p.numel() for n, p in named if n.startswith("calibrator.")),
           "summary_tokens": sum(p.numel() for n, p in named if n in ("query_token", "target_token")),
           "vision": sum(p.numel() for p in embedder.vision_parameters())}
    got["other"] = sum(p.numel() for _, p in named) - sum(got.values())  # must be 0
    c = embedder.config
    d, h, r = int(qcfg.text_config.hidden_size), c.calibrator_hidden, c.calibrator_rank
    calib = 0 if c.calibrator == "off" else d * h + h + 2 * h + h * (2 * d * r + 1) + (2 * d * r + 1)
    derived = {"lora": flop_counts(qcfg, c.lora_r).p_lora, "calibrator": calib, "summary_tokens": 2 * d,
               "vision": 0, "other": 0}
    return {"counted": got, "derived_from_config": derived, "agree": got == derived,
            "total": sum(p.numel() for _, p in named)}


def param_bytes(embedder) -> dict:
    """Bytes of every weight and of the trainable ones (their dtype as built: bf16 base, fp32 tokens)."""
    ps = list(embedder.parameters())
    return {"all": sum(p.numel() * p.element_size() for p in ps),
            "trainable": sum(p.numel() * p.element_size() for p in ps if p.requires_grad)}


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
               "peak_tflops": peak, "params": embedder.param_counts(), "rows": [],
               "trainable": trainable_groups(embedder, qcfg), "param_bytes": param_bytes(embedder)}
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
# Each chunk size in its own process, and the GPU memory they imply at the authors' batch
# =================================================================================================

def child_argv(cfg: BenchConfig, chunk: int, out: str, encode: bool) -> list:
    """The command line of one isolated configuration: this script, one chunk size, its own --out."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--size", cfg.size, "--device", cfg.device,
            "--dtype", cfg.dtype, "--kinds", ",".join(cfg.kinds), "--chunks", str(chunk),
            "--batch", str(cfg.batch), "--warmup", str(cfg.warmup), "--steps", str(cfg.steps),
            "--seed", str(cfg.seed), "--backbone-dir", cfg.backbone_dir, "--out", out,
            "--encode-images", str(cfg.encode_images if encode else 0), "--encode-batch", str(cfg.encode_batch)]
    if cfg.text_tokens:
        argv += ["--text-tokens", str(cfg.text_tokens)]
    if cfg.mod_tokens:
        argv += ["--mod-tokens", str(cfg.mod_tokens)]
    if cfg.peak_tflops:
        argv += ["--peak-tflops", str(cfg.peak_tflops)]
    return argv + (["--two-chunks"] if cfg.two_chunks else []) + (["--forward-only"] if cfg.forward_only else [])


def run_isolated(cfg: BenchConfig) -> dict:
    """Every chunk size of cfg.chunks in a process of its own (the gallery encode in the first one), each
    within cfg.time_box seconds; a process killed for memory, failing or timing out is recorded as such
    and the next chunk size still runs. The checkpoint is written once, before the first process."""
    import subprocess

    import multiprocessing

    # Written by a process of its own too: a parent that built the 4B would keep its ~9 GB (freed memory is
    # not always returned to the system) while each child loads another copy.
    writer = multiprocessing.get_context("spawn").Process(target=ensure_checkpoint,
                                                          args=(cfg, Path(cfg.backbone_dir), None, False))
    writer.start()
    writer.join()
    if writer.exitcode != 0:
        raise RuntimeError(f"writing the random {cfg.size} checkpoint into {cfg.backbone_dir} failed "
                           f"(exit {writer.exitcode}; its error is printed above)")
    res, outcomes = None, []
    with tempfile.TemporaryDirectory(prefix="paper_scale_iso_") as tmp:
        for i, chunk in enumerate(cfg.chunks):
            out = str(Path(tmp) / f"chunk{chunk}.json")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(child_argv(cfg, chunk, out, encode=(i == 0)), capture_output=True,
                                      text=True, timeout=cfg.time_box or None)
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
            except subprocess.TimeoutExpired as e:
                rc, tail = None, f"timed out after {cfg.time_box} s: {str(e.stdout or '')[-500:]}"
            seconds = time.perf_counter() - t0
            if rc == 0:
                got = json.loads(Path(out).read_text())
                res = res or {k: v for k, v in got.items() if k != "rows"} | {"rows": []}
                res["rows"] += got["rows"]
                if got.get("encode"):
                    res["encode"] = got["encode"]
                status = "ok"
            elif rc is None:
                status = "timed out"
            elif rc in (-9, 137) or "MemoryError" in tail or "out of memory" in tail.lower():
                status = "out of memory"  # the kernel's OOM killer sends SIGKILL
            else:
                status = f"failed (exit {rc})"
            outcomes.append({"chunk": chunk, "status": status, "seconds": seconds,
                             "log_tail": None if rc == 0 else tail})
            print(f"chunk {chunk}: {status} ({seconds:.0f} s)", flush=True)
    if res is None:
        raise RuntimeError("no isolated configuration finished: " + "; ".join(
            f"chunk {o['chunk']} {o['status']}: {(o['log_tail'] or '')[-300:]}" for o in outcomes))
    res["isolated"] = outcomes
    res["gpu_projection"] = project_memory(res)
    return res


# Visual tokens of one query row per sub-dataset of the authors' chunk table, at the `paper` recipe's caps:
# an image at most 256^2 pixels = 64 tokens + <|vision_start|>/<|vision_end|>; a video 8 frames at 224^2 =
# 4 temporal groups of 7 x 7 tokens, each with its "<t seconds>" (~6 tokens) and markers. Query images:
# the recipe's caps where a query can hold several (8 per prompt; 5 for the two capped sketch sets,
# recipes.TRAIN_QUERY_IMAGE_CAP; DeepFashion2's multi-photo queries and Polyvore's outfits at 8), one
# where the dataset's query is one image (FashionVC's outfits are a top and a bottom: one query item;
# HAIFashion: one sketch, assumed). Upper bounds for planning: real rows are often shorter.
IMAGE_TOKENS_MAX = 64 + 2
VIDEO_TOKENS = 4 * (49 + 2 + 6)
QUERY_IMAGES = {"t2i/FashionGen": 0, "t2i/Shoes": 0, "sketch2i/ClothesV1": 5, "sketch2i/HAIFashion": 1,
                "sketch2i/QMUL-Shoe-V2": 5, "inshop/DeepFashion": 1, "street2shop/DeepFashion2": 8,
                "compatibility/FashionVC": 1, "compatibility/Polyvore": 8, "video2img/MovingFashion": 0,
                "cir/Fashion200K": 1, "cir/FashionIQ-Dress": 1, "cir/FashionIQ-Shirt": 1,
                "cir/FashionIQ-Toptee": 1, "cir/Shoes": 1, "sketch&text/CSTBIR": 1, "asfr/DARN": 1,
                "asfr/FashionAI": 1}


def query_visual_tokens(subset: str) -> int:
    """The most visual tokens one query row of `subset` holds (QUERY_IMAGES, the video of video2img)."""
    return QUERY_IMAGES[subset] * IMAGE_TOKENS_MAX + (VIDEO_TOKENS if subset.startswith("video2img/") else 0)


def project_memory(res: dict, batch: int = 64) -> dict:
    """The GPU memory a `paper` step at `batch` pairs needs for each sub-dataset of the authors' chunk table,
    from the measured steps: activations scale with the tokens of one chunk, not with the batch (GradCache
    keeps only the batch's embeddings and their gradients, batch x D floats, across chunks).

        step memory(chunk) ~ a + k x tokens in the chunk        least squares over the measured chunk sizes
        GPU memory(sub)    ~ weights + 3 x trainable bytes (gradient, AdamW's two moments) + a
                             + k x chunk(sub) x (query row + target row tokens, at the recipe's caps)

    Row tokens: the prompt frames and the real instructions' longest (benchmarks/prompt_lengths.json), plus
    query_visual_tokens; the target: its frame + one image. A CPU's activations are not a GPU's (different
    kernels and allocator), so this is an estimate to plan a card with, not a measurement."""
    from support import recipes

    rows = [r for r in res["rows"] if r.get("step_memory_bytes") is not None or r.get("memory_kind", "").startswith("cuda")]
    pts = []
    for r in rows:
        mem = r.get("step_memory_bytes")
        if mem is None:  # a GPU run: its peak minus the weights held before the step
            mem = r["peak_memory_bytes"] - (res.get("weights_memory_bytes") or 0)
        pts.append((r["chunk"] * r["tokens_per_step"] / r["batch"], mem))  # (tokens in one chunk, bytes)
    if len(pts) < 2:
        return {"note": "needs two or more measured chunk sizes"}
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    k = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0  # bytes per token in a chunk
    a = my - k * mx
    lengths = json.loads(PROMPT_LENGTHS.read_text(encoding="utf-8"))["qwen"]
    frame_q, frame_t = lengths["prompt_frame"]["query"], lengths["prompt_frame"]["target"]
    text_max = lengths["real"]["instruction_text"]["max"]
    static = res["param_bytes"]["all"] + 3 * res["param_bytes"]["trainable"]
    table = {}
    for sub, chunk in recipes.CHUNK_SIZES.items():
        q = frame_q + text_max + query_visual_tokens(sub)
        t = frame_t + IMAGE_TOKENS_MAX
        table[sub] = {"chunk": chunk, "pair_tokens": q + t,
                      "gib": (static + max(a, 0.0) + k * chunk * (q + t)) / 2 ** 30}
    worst = max(table, key=lambda s: table[s]["gib"])
    return {"batch": batch, "bytes_per_chunk_token": k, "intercept_bytes": a, "static_bytes": static,
            "fit_points": pts, "per_subset": table, "largest": {"subset": worst, **table[worst]}}


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
    ap.add_argument("--text-tokens", type=int, default=0,
                    help="tokens of a t2i query text (0: the real median, benchmarks/prompt_lengths.json)")
    ap.add_argument("--mod-tokens", type=int, default=0,
                    help="tokens of a cir instruction (0: the real median, benchmarks/prompt_lengths.json)")
    ap.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float32"],
                    help="backbone weights (default: bfloat16 for --size 4b, auto = float32 on a CPU for test)")
    ap.add_argument("--two-chunks", action="store_true",
                    help="batch = chunk + 1 per configuration: the smallest real GradCache step (a CPU's 4B run)")
    ap.add_argument("--forward-only", action="store_true",
                    help="per chunk size, one chunk's forward with gradients kept and no backward: the memory "
                         "GradCache's pass with grad holds (for a CPU whose bfloat16 backward is too slow)")
    ap.add_argument("--isolate", action="store_true",
                    help="each chunk size in its own process (needs --backbone-dir); adds the GPU memory projection")
    ap.add_argument("--time-box", type=int, default=0, help="seconds per isolated process (0 = no limit)")
    ap.add_argument("--encode-batch", type=int, default=64, help="batch of the gallery encode (evaluate.py: 64)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="merge the rows of earlier --out files of one size (e.g. chunk sizes run on different "
                         "days), add the GPU memory projection, print and write --out; runs nothing")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 3; test: 2)")
    ap.add_argument("--encode-images", type=int, default=None, help="photos to encode (default 256; test: 16; 0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s for the MFU (default: 989, H200 bf16, on CUDA; none on a CPU)")
    ap.add_argument("--backbone-dir", default="", help="keep the random checkpoint here (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (e.g. benchmarks/paper_scale.json)")
    return ap


SIZE_DEFAULTS = {"4b": dict(batch=64, chunks="8,32", steps=3, encode_images=256, dtype="bfloat16"),
                 "test": dict(batch=8, chunks="2,8", steps=2, encode_images=16, dtype="auto")}


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
              "--text-tokens": (args.text_tokens, args.text_tokens >= 0, "must be >= 0"),
              "--mod-tokens": (args.mod_tokens, args.mod_tokens >= 0, "must be >= 0"),
              "--time-box": (args.time_box, args.time_box >= 0, "must be >= 0"),
              "--encode-batch": (args.encode_batch, args.encode_batch >= 1, "must be >= 1"),
              "--isolate": (args.isolate, not args.isolate or bool(args.backbone_dir),
                            "needs --backbone-dir (every process loads the same checkpoint)"),
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
    if args.out:
        plumbing.check_writable("--out", args.out, folder=False)
    if args.backbone_dir:
        plumbing.check_writable("--backbone-dir", args.backbone_dir)
    cfg = BenchConfig(size=args.size, device=device, batch=args.batch, chunks=chunks, kinds=kinds,
                      text_tokens=args.text_tokens, mod_tokens=args.mod_tokens, warmup=args.warmup,
                      steps=args.steps, encode_images=args.encode_images, encode_batch=args.encode_batch,
                      seed=args.seed, peak_tflops=args.peak_tflops, backbone_dir=args.backbone_dir,
                      dtype=args.dtype, two_chunks=args.two_chunks, isolate=args.isolate, time_box=args.time_box,
                      forward_only=args.forward_only)
    return cfg, args.out


def main(argv=None) -> int:
    """The command line, through errors.run_cli: a bad flag is one `error:` line and exit 1."""
    return run_cli(_main, argv)


def combine(files: list) -> dict:
    """Earlier --out files of one --size merged into one result: their rows, encode and isolated outcomes
    in order, the first file's header and counts, and the GPU memory projection over all the rows."""
    docs = []
    for f in files:
        try:
            docs.append(json.loads(Path(f).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise FlagError(f"--combine {f}: not a readable paper_scale JSON ({e})") from None
        if not isinstance(docs[-1], dict) or "rows" not in docs[-1] or "header" not in docs[-1]:
            raise FlagError(f"--combine {f}: not a paper_scale result (no rows / header)")
    sizes = {d["header"]["size"] for d in docs}
    if len(sizes) > 1:
        raise FlagError(f"--combine: the files are of different sizes {sorted(sizes)}")
    res = {k: v for k, v in docs[0].items() if k not in ("rows", "isolated", "encode")}
    res["rows"] = [r for d in docs for r in d["rows"]]
    res["isolated"] = [o for d in docs for o in d.get("isolated", [])]
    res["encode"] = next((d["encode"] for d in docs if d.get("encode")), {})
    res["combined_from"] = [{"file": str(f), "date": d["header"]["date"], "commit": d["header"]["commit"]}
                            for f, d in zip(files, docs)]
    res["gpu_projection"] = project_memory(res)
    return res


def _main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--combine" in argv:  # merge earlier results: no flag but --out applies, nothing is built
        args = build_parser().parse_args(argv)
        res = combine(args.combine)
        banner = cpu_banner(res["header"]["device"])
        if banner:
            print(banner, flush=True)
        return _report(res, args.out, banner)
    cfg, out = parse_flags(argv)
    banner = cpu_banner(cfg.device)
    if banner:
        print(banner, flush=True)
    res = run_isolated(cfg) if cfg.isolate else run(cfg)
    return _report(res, out, banner)


def _report(res: dict, out: Optional[str], banner: str) -> int:
    """Print a result's tables (and its CPU banner) and write it to `out`."""
    h = res["header"]
    print(f"\nQwen3-VL {h['size']} (random weights, {h['dtype']}, {h['attn_implementation']}) on {h['device']}"
          f"{' (' + h['machine']['gpu'] + ')' if h['machine']['gpu'] else ''}; "
          f"{res['params']['total'] / 1e9:.3f} B parameters, {res['params']['trainable'] / 1e6:.1f} M trainable; "
          f"{h['date']}, commit {h['commit']}")
    print(table(res))
    t = res["trainable"]
    print("trainable parameters: " + ", ".join(f"{g} {n:,}" for g, n in t["counted"].items() if n)
          + f" = {t['total']:,}; derived from the config: {'the same' if t['agree'] else t['derived_from_config']}")
    for o in res.get("isolated", []):
        if o["status"] != "ok":
            print(f"chunk {o['chunk']}: {o['status']}")
    proj = res.get("gpu_projection") or {}
    if "largest" in proj:
        w = proj["largest"]
        print(f"projected GPU memory at batch {proj['batch']} with the authors' chunk table: at most "
              f"{w['gib']:.1f} GiB ({w['subset']}, chunk {w['chunk']}, ~{w['pair_tokens']} tokens a pair; "
              f"{proj['bytes_per_chunk_token'] / 2 ** 20:.2f} MiB per token in a chunk)")
    if banner:
        print(banner)
    if out:
        from support import plumbing

        plumbing.atomic_write(Path(out), json.dumps(res, indent=1, allow_nan=False) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
