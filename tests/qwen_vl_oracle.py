"""qwen-vl-utils (the authors' preprocessing library) run as an oracle, in a child process.

    python tests/qwen_vl_oracle.py < cases.json > results.json

The authors' collators (code/dataset.py 394, code/evaluate.py 208, code/test.py 221) call
`qwen_vl_utils.process_vision_info(..., image_patch_size=16)`, which resizes each image with
`fetch_image` / `smart_resize` and reads each video with `fetch_video` (its frame count from
`smart_nframes`, its frame indices from the video backend). qwen_vl_utils 0.0.14 imports torchvision at
module level; this project never installs torchvision, and the functions used here need only PIL, math
and torch. So this script puts a stand-in `torchvision` into `sys.modules` before the import -- in this
child process only: a stub left in the test process would break transformers' torchvision detection
for every later test (issue 31).

The stand-ins, and what they do NOT decide:
  * `torchvision.transforms.functional.resize`: torch's antialiased bicubic `interpolate`. Only the
    output SHAPE is read from it (the size comes from the library's smart_resize); its pixel values are
    not torchvision's.
  * `decord`: a fake module whose `VideoReader(path)` is a clip described by its path
    ("fake://frames=N,fps=F,height=H,width=W") and RECORDS every `get_batch(indices)` the library asks for.
    `FORCE_QWENVL_VIDEO_READER=decord` makes the library's own backend dispatch
    (`get_video_reader_backend`) pick it, so the indices are those of the library's `_read_video_decord`
    (its linspace, its rounding, `calculate_video_frame_range`), not a re-typed copy.
  * `torchvision.io.read_video`: the same fake clip, so the library's fallback reader (it retries with
    torchvision when the first backend raises) runs its own code too; its calls are recorded as well.

Input (stdin): a JSON list of cases, each a dict with "kind":
  {"kind": "smart_resize", "height", "width", "factor", "min_pixels", "max_pixels"}
      -> {"size": [height, width]} or {"error": "ValueError: ..."}
  {"kind": "image", "path" | "size": [w, h], "patch": 16, "min_pixels", "max_pixels", "out": path | null}
      fetch_image({"image": path-or-PIL, "min_pixels", "max_pixels"}, image_patch_size=patch)
      -> {"size": [w, h]} (PIL order), the resized image saved to "out" as PNG when given; or {"error"}
  {"kind": "video", "frames": N, "fps": F, "ele": {...extra message keys...}, "patch": 16}
      fetch_video({"video": fake path, **ele}, image_patch_size=patch, return_video_sample_fps=True,
      return_video_metadata=True)
      -> {"shape": [T, C, H, W], "indices": [...] (the recorded get_batch), "frames_indices": [...]
          (the library's metadata), "sample_fps", "calls": [["decord.open", N] | ["decord", idx] | ["torchvision", N]]}
      or {"error", "calls"}
Output (stdout): a JSON list of results, one per case, in order.
"""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

CALLS: list = []  # what the fake backends were asked for, per video case (reset before each case)


def _parse_fake(path: str) -> dict:
    """"fake://frames=16,fps=30,height=8,width=8" -> {"frames": 16, "fps": 30.0, "height": 8, "width": 8}."""
    if not path.startswith("fake://"):
        raise FileNotFoundError(f"the oracle reads only fake:// clips, got {path!r}")
    spec = dict(kv.split("=") for kv in path[len("fake://"):].split(","))
    return {"frames": int(spec["frames"]), "fps": float(spec["fps"]),
            "height": int(spec.get("height", 8)), "width": int(spec.get("width", 8))}


def _frames(spec: dict, idx) -> np.ndarray:
    """Frames idx of a fake clip, (k, H, W, 3) uint8; frame i is filled with i % 256 (red channel)."""
    out = np.zeros((len(idx), spec["height"], spec["width"], 3), dtype=np.uint8)
    out[..., 0] = (np.asarray(idx, dtype=np.int64) % 256)[:, None, None]
    return out


class _Batch:
    """decord's NDArray stand-in: only `asnumpy` is used by the library."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def asnumpy(self) -> np.ndarray:
        return self.array


class _VideoReader:
    """decord.VideoReader stand-in over a fake clip; records each get_batch(indices)."""

    def __init__(self, path: str, *args, **kwargs):
        self.spec = _parse_fake(path)
        CALLS.append(["decord.open", self.spec["frames"]])

    def __len__(self) -> int:
        return self.spec["frames"]

    def get_avg_fps(self) -> float:
        return self.spec["fps"]

    def get_batch(self, idx):
        CALLS.append(["decord", [int(i) for i in idx]])
        return _Batch(_frames(self.spec, idx))


def _read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    """torchvision.io.read_video stand-in: every frame of the fake clip, TCHW uint8, and its fps."""
    spec = _parse_fake(path)
    CALLS.append(["torchvision", spec["frames"]])
    video = torch.from_numpy(_frames(spec, range(spec["frames"]))).permute(0, 3, 1, 2)  # (N, 3, H, W)
    return video, None, {"video_fps": spec["fps"]}


def _resize(video, size, interpolation=None, antialias=True):
    """torchvision.transforms.functional.resize stand-in: the requested size (values not torchvision's)."""
    return torch.nn.functional.interpolate(video.float(), size=list(size), mode="bicubic",
                                           antialias=True, align_corners=False)  # (T, C, h, w)


def install_stubs() -> None:
    """Put the fake torchvision and decord into sys.modules (this process only) and force decord."""
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0+qwen-vl-oracle-stub"
    tv_io = types.ModuleType("torchvision.io")
    tv_io.read_video = _read_video
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize = _resize
    transforms.functional = functional
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    tv.io, tv.transforms = tv_io, transforms
    decord = types.ModuleType("decord")
    decord.VideoReader = _VideoReader
    sys.modules.update({"torchvision": tv, "torchvision.io": tv_io, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional, "decord": decord})
    os.environ["FORCE_QWENVL_VIDEO_READER"] = "decord"  # read once, when vision_process is imported


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"}


def run(cases: list) -> list:
    """Each case through the library (see the module docstring) -> its result dict."""
    install_stubs()
    import logging

    logging.disable(logging.WARNING)  # the library logs its fallback; the result says what happened
    from qwen_vl_utils import vision_process as vp

    results = []
    for case in cases:
        kind = case["kind"]
        try:
            if kind == "smart_resize":
                h, w = vp.smart_resize(case["height"], case["width"], factor=case["factor"],
                                       min_pixels=case["min_pixels"], max_pixels=case["max_pixels"])
                results.append({"size": [h, w]})
            elif kind == "image":
                image = case.get("path") or Image.new("RGB", tuple(case["size"]), (128, 64, 32))
                ele = {"image": image, "min_pixels": case["min_pixels"], "max_pixels": case["max_pixels"]}
                out = vp.fetch_image(ele, image_patch_size=case["patch"])
                if case.get("out"):
                    out.save(case["out"], format="PNG")
                results.append({"size": list(out.size)})
            elif kind == "video":
                CALLS.clear()
                spec = f"fake://frames={case['frames']},fps={case['fps']}"
                ele = {"type": "video", "video": spec, **case.get("ele", {})}
                try:
                    (video, meta), fps = vp.fetch_video(ele, image_patch_size=case["patch"],
                                                        return_video_sample_fps=True, return_video_metadata=True)
                except Exception as e:  # noqa: BLE001 -- the library's own refusal is a result
                    results.append({**_error(e), "calls": list(CALLS)})
                    continue
                decord_calls = [c[1] for c in CALLS if c[0] == "decord"]
                results.append({"shape": list(video.shape), "indices": decord_calls[-1] if decord_calls else None,
                                "frames_indices": [int(i) for i in meta["frames_indices"]],
                                "sample_fps": float(fps), "calls": list(CALLS)})
            else:
                raise ValueError(f"unknown case kind {kind!r}")
        except Exception as e:  # noqa: BLE001 -- an error is the oracle's answer for that case
            results.append(_error(e))
    return results


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)
