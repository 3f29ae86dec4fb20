"""The embedder's inference speed-ups: merged LoRA, encoding threads, and the batched no-grad encode
loop that uses them (support code: skip on first read).

The reference is model.py's FashionLensEmbedder.forward on each batch in turn; this loop computes the
same vectors. Speed without changing the method: on a CPU, LoRA is merged into the weights for the
duration (merge_lora=None: on a CPU only, see merged_lora), and when torch runs one thread per process
(the tiny default) one thread per core encodes its own batches: each thread collates a batch (Python
work) while the other computes (torch releases the GIL inside its kernels). tests/test_fast_paths.py
holds two threads equal to one (bit for bit) and tests/test_model.py merged LoRA equal to the
unmerged adapters (within 1e-5).
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch


def encode_threads(device: torch.device) -> int:
    """Threads that encode batches side by side: one per core when torch itself runs one thread on
    a CPU (a small model, see plumbing.set_cpu_threads); else 1, and torch splits each op instead."""
    if device.type != "cpu" or torch.get_num_threads() > 1:
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def encode_batches(emb, parts: list, encode_part: Callable, desc: str, progress: bool,
                   merge_lora: Optional[bool]) -> torch.Tensor:
    """encode_part(part) -> (b, D) for every batch in `parts`, in eval mode (the caller's mode is
    restored), LoRA merged when `merge_lora` (None: on a CPU), on encode_threads(emb.device) threads;
    the (B, D) concatenation in input order."""
    workers = encode_threads(emb.device) if len(parts) > 1 else 1
    merge = emb.device.type == "cpu" if merge_lora is None else merge_lora
    was_training = emb.training
    emb.eval()
    try:
        with emb.merged_lora() if merge else contextlib.nullcontext():
            with ThreadPoolExecutor(workers) as pool:
                done = pool.map(encode_part, parts)  # results in input order
                if progress:
                    from tqdm import tqdm
                    done = tqdm(done, total=len(parts), desc=desc, unit="batch")
                chunks = list(done)                             # [(batch, D)]
        return torch.cat(chunks) if chunks else torch.zeros(0, emb.dim)  # (B|G, D)
    finally:
        emb.train(was_training)


@contextlib.contextmanager
def merged_lora(emb):
    """Inference with embedder `emb`'s LoRA folded into the weights: each adapted linear computes
    (W + s B A) x in one matmul instead of W x + s B (A x) in three, which on a CPU is mostly per-call
    overhead.

    The fast twin of the adapters as peft runs them (model.encode_*): the same function up to float
    rounding (tests/test_fast_paths.py holds the two within 1e-5). The original W
    tensors are put back afterwards, untouched: subtracting s B A again would leave rounding
    errors in the frozen weights, and training would no longer be exactly reproducible.
    Costs one extra copy of the adapted weights while active (why it is off on a GPU by default).
    """
    from peft.tuners.lora import LoraLayer

    if emb._lora_merged:  # nested use (evaluate.py merges once around many encode calls)
        yield emb
        return
    saved = []  # (weight Parameter, its original tensor)
    with torch.no_grad():
        for layer in emb.backbone.modules():
            if not isinstance(layer, LoraLayer):
                continue
            w = layer.get_base_layer().weight                   # (out, in) frozen W
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)  # (out, in) s B A
            saved.append((w, w.data))
            w.data = w.data + delta                              # (out, in) W + s B A, a new tensor
    try:
        emb._lora_merged = True
        with emb.backbone.disable_adapter():  # peft: adapted layers now run their base layer only
            yield emb
    finally:
        emb._lora_merged = False
        for w, original in saved:
            w.data = original
