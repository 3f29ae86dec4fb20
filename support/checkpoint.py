"""The embedder's checkpoint folder: writing it, loading it, and refusing a damaged one (support code:
skip on first read).

A checkpoint folder holds: the embedder config (CONFIG_FILE, JSON, with a sha256 of each weight file),
the LoRA adapter in peft's own format (ADAPTER_DIR), the summary tokens + calibrator + trained vision
tower (WEIGHTS_FILE, safetensors), the processor (PROCESSOR_DIR), and for a tiny backbone its random
base (BASE_DIR: it cannot be downloaded, and re-drawing it is not guaranteed). Plain peft can open the
adapter directly.

Every way a folder can be damaged or edited (missing files, another backbone, edited configs, weights
of another shape, truncated files, another checkpoint format) raises CheckpointError naming the file,
and the field when a config contradicts what was saved with it. An edited config is caught by a copy
of its fields kept where editing the config cannot reach: WEIGHTS_FILE's safetensors metadata holds
every EmbedderConfig field but the runtime ones (RUNTIME_FIELDS), with their sha256, and the config
file holds WEIGHTS_FILE's sha256. A checkpoint written before that copy existed loads with one warning;
one written before a config field existed loads with that field's old behaviour (BEFORE_FIELD).

Also here: `typed_config`, a config dataclass from a saved JSON object with each value checked
against the field's declared type (embedder_config.json here, a run's train_config.json in run_dir).

The embedder (model.py: FashionLensEmbedder.save_into / save_pretrained / from_pretrained) calls
`save_into(emb, folder)`, `load(cls, config_cls, path, ...)`, `load_lora` and `load_extras`; its class
and config class are passed in, so this module imports no concept file.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from support.errors import CheckpointError, FashionLensError
from support.plumbing import file_sha256, json_sha256, warn_once
from support.tiny_backbone import TINY_TYPES

# The checkpoint layout and prompts of this version; older formats are refused (load).
CHECKPOINT_FORMAT = 2
# The checkpoint folder's layout (names other tools, e.g. plain peft, can open directly).
CONFIG_FILE, WEIGHTS_FILE = "embedder_config.json", "embedder.safetensors"
ADAPTER_DIR, PROCESSOR_DIR, BASE_DIR = "adapter", "processor", "base"
# EmbedderConfig fields that say where and how fast the model runs, not what it computes: a checkpoint
# may be loaded with other values. Every other field (sizes, frames, pixel budget, prompts, LoRA,
# calibrator, backbone, and any field added later) is recorded in WEIGHTS_FILE's metadata and checked.
RUNTIME_FIELDS = frozenset({"device", "dtype", "attn_implementation"})
# EmbedderConfig fields added after checkpoints existed, and how a checkpoint saved without one computed:
# Qwen's mRoPE positions and exact slerp (issue 31). Filled in before the recipe could fill them otherwise.
BEFORE_FIELD = {"positions": "mrope", "slerp_edge": "exact"}
# WEIGHTS_FILE's metadata key: {"config": those fields, "sha256": their json_sha256} as canonical JSON. One
# key only: safetensors writes its metadata map in no fixed order, and two saves must give the same bytes.
META_CONFIG = "fashionlens.config"


# ================================================================================================
# Save
# ================================================================================================


def save_into(emb, folder: str | os.PathLike) -> None:
    """Write every checkpoint file of embedder `emb` into `folder`, which must not exist yet (it is
    created).

    Not atomic on its own: save_pretrained, and train.py's checkpoints, call it through
    plumbing.atomic_write, which builds the folder beside the target and swaps it in.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True)
    emb.backbone.save_pretrained(str(folder / ADAPTER_DIR))  # peft's own format
    computed = computed_fields(asdict(emb.config))  # out of reach of an edit of CONFIG_FILE (see above)
    save_file(_extra_state(emb), str(folder / WEIGHTS_FILE),
              metadata={META_CONFIG: json.dumps({"config": computed, "sha256": json_sha256(computed)}, sort_keys=True)})
    emb.processor.save_pretrained(str(folder / PROCESSOR_DIR))
    if emb.tiny:  # a random base must travel with its checkpoint
        (folder / BASE_DIR).mkdir()
        emb._base().config.save_pretrained(str(folder / BASE_DIR))
        save_file(_clean_base_state(emb), str(folder / BASE_DIR / "model.safetensors"))
    # The config goes last, with a sha256 of each weight file: a damaged weight file (truncated,
    # zeroed, overwritten) often still parses, and would load as silently wrong weights.
    weights = [f for f in required_files(asdict(emb.config)) if f.endswith(".safetensors")]
    meta = {"config": asdict(emb.config), "versions": _versions(), "model_type": emb.model_type,
            "dim": emb.dim, "format": CHECKPOINT_FORMAT,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "sha256": {f: file_sha256(folder / f) for f in weights}}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def _extra_state(emb) -> dict[str, torch.Tensor]:
    """Tokens, calibrator and trained non-LoRA base weights (e.g. the tiny vision tower)."""
    state = {"query_token": emb.query_token.detach(), "target_token": emb.target_token.detach()}  # (D,) each
    if emb.calibrator is not None:
        state.update({f"calibrator.{k}": v for k, v in emb.calibrator.state_dict().items()})
    if emb.train_vision:
        state.update({f"visual.{k}": v for k, v in emb._base().visual.state_dict().items()})
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def _clean_base_state(emb) -> dict[str, torch.Tensor]:
    """The base model's weights without LoRA (names as the plain architecture expects)."""
    out = {}
    for k, v in emb._base().state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().cpu().contiguous().clone()  # v's shape, on CPU
    return out


def computed_fields(config: dict) -> dict:
    """The fields of a saved embedder config that change what the model computes (all but RUNTIME_FIELDS).

    The backbone counts by its name, not its path: a local backbone folder moved to another disk (and
    the config's path edited to follow it) is the same model, while another model's name is refused.
    """
    out = {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}
    if isinstance(out.get("backbone"), str):
        out["backbone"] = out["backbone"].rstrip("/").split("/")[-1]  # hub id or folder -> the model's name
    return out


def required_files(meta_config: dict) -> list[str]:
    """The files a complete checkpoint of this config has (checked before loading anything)."""
    files = [CONFIG_FILE, WEIGHTS_FILE, f"{ADAPTER_DIR}/adapter_config.json",
             f"{ADAPTER_DIR}/adapter_model.safetensors", f"{PROCESSOR_DIR}/tokenizer.json"]
    if meta_config.get("backbone") in TINY_TYPES:
        files += [f"{BASE_DIR}/config.json", f"{BASE_DIR}/model.safetensors"]
    return files


# ================================================================================================
# Load
# ================================================================================================


def load(cls, config_cls, path: str | os.PathLike, backbone: Optional[str] = None,
         device: Optional[str] = None):
    """Load a checkpoint folder as an embedder of class `cls` (config class `config_cls`). `backbone`
    (optional) asserts which backbone the caller expects.

    Every way a folder can be wrong (missing files, another backbone, edited configs, weights of
    another shape, damaged files) raises CheckpointError naming the file, and the field when a
    config contradicts what was saved with it, before or while loading. A checkpoint of another
    format (format 1: other prompts and image handling) is refused, saying to retrain it. The
    backbone of a real-Qwen checkpoint is loaded from its folder or the local Hugging Face cache
    (qwen.backbone_folder), never downloaded.
    """
    path = Path(path)
    meta, config = _read_meta(path, config_cls)
    check_files(path, meta)  # every file there, weight files as saved (sha256)
    if backbone is not None and not _same_backbone(backbone, config.backbone):
        raise CheckpointError(f"{path}: checkpoint was trained on backbone {config.backbone!r}, "
                              f"not {backbone!r}")
    _check_saved_files(path, meta, config)  # cheap checks first: JSON files, the config's saved copy
    if device is not None:
        config.device = device
    emb = cls(config, _checkpoint=str(path))  # loading itself names a file it cannot parse
    _check_built(path, meta, emb)  # what only the built model knows: width, pixel budget
    return emb


def load_lora(base, ckpt: Path):
    """`base` wrapped in the LoRA adapter saved in checkpoint `ckpt` (trainable)."""
    from peft import PeftModel

    # peft's own errors for a damaged adapter (safetensors, JSON) name no file.
    with _reading(ckpt / ADAPTER_DIR / "adapter_model.safetensors", "LoRA adapter"):
        return PeftModel.from_pretrained(base, str(ckpt / ADAPTER_DIR), is_trainable=True)


def load_extras(emb, ckpt: Path) -> None:
    """Copy the saved tokens, calibrator and vision tower (WEIGHTS_FILE) into embedder `emb`."""
    file = ckpt / WEIGHTS_FILE
    state = _load_weights(file)
    # Parts the config switches off must not be silently dropped: their weights say the
    # checkpoint was trained with them, so the edited config would change what it computes.
    for prefix, field, on in (("calibrator.", "calibrator", emb.calibrator is not None),
                              ("visual.", "train_vision", emb.train_vision)):
        if not on and any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{ckpt / CONFIG_FILE}: {field}={getattr(emb.config, field)!r} "
                                  f"switches off the {prefix[:-1]} weights saved in {file}")
    c = emb.config
    with torch.no_grad():
        for name in ("query_token", "target_token"):
            src = state.get(name)                                # (D,)
            if src is None or src.shape != (emb.dim,):
                got = "missing" if src is None else f"of shape {tuple(src.shape)}"
                raise CheckpointError(f"{file}: {name} is {got}, expected ({emb.dim},) (dim of the "
                                      f"{emb.model_type} backbone) -- checkpoint of another backbone?")
            getattr(emb, name).copy_(src)
        parts = []  # (module, its saved weights, the config fields that shape it)
        if emb.calibrator is not None:
            parts.append((emb.calibrator, _strip(state, "calibrator."),
                          f"calibrator={c.calibrator!r}, calibrator_rank={c.calibrator_rank}, "
                          f"calibrator_hidden={c.calibrator_hidden}"))
        if emb.train_vision:
            parts.append((emb._base().visual, {k: v.to(emb.model_dtype) for k, v in
                                               _strip(state, "visual.").items()},
                          f"train_vision={c.train_vision!r}"))
        for module, saved, fields_ in parts:
            try:
                module.load_state_dict(saved, strict=True)
            except RuntimeError as e:  # missing keys or other shapes: name the fields that decide them
                raise CheckpointError(f"{file}: the saved weights do not fit {fields_} of "
                                      f"{ckpt / CONFIG_FILE} ({_one_line(e)})") from e


# ================================================================================================
# Checkpoint checks: each way a folder can be damaged or edited is refused naming file and field.
# ================================================================================================
def _read_meta(path: Path, config_cls) -> tuple:
    """(the saved embedder_config.json, its config as a `config_cls`), or CheckpointError naming the file.

    A checkpoint of another format is refused first: format 1 (no "format" 2 in the file) was written
    with other prompts and image handling (other sentences, summary tokens from other words, square
    image_size images, video frames as separate images), so its weights do not fit this model.
    """
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a FashionLens checkpoint (missing {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
        fmt = meta.get("format", 1)
        if fmt != CHECKPOINT_FORMAT:
            older = isinstance(fmt, int) and fmt < CHECKPOINT_FORMAT
            raise CheckpointError(
                f"{cfg_file}: checkpoint format {fmt!r}, this version reads format {CHECKPOINT_FORMAT}: "
                + ("it was written with other prompts and image handling (square images, video frames as "
                   "images, other summary-token initialisation) and must be retrained with this version"
                   if older else "it was written by a newer FashionLens"))
        values = meta["config"]
        values = {**BEFORE_FIELD, **values} if isinstance(values, dict) else values  # typed_config names a non-object
        config = typed_config(config_cls, values, cfg_file, CheckpointError)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # bad JSON or UTF-8; nested absurdly
        raise CheckpointError(f"{cfg_file}: unreadable embedder config ({_one_line(e)})") from e
    return meta, config


def check_files(path: Path, meta: Optional[dict] = None) -> dict:
    """Without building anything: the checkpoint's files are all there and its weight files are the ones
    saved (sha256); returns the saved CONFIG_FILE, or raises CheckpointError naming the file. Cheap: a
    resume checks the run's best/ with it before training on."""
    if meta is None:
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path}: not a FashionLens checkpoint (missing {CONFIG_FILE})")
        meta = _read_json(path / CONFIG_FILE)
    missing = [f for f in required_files(meta.get("config") or {}) if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    # A truncated or overwritten weight file is named here, before any library tries to parse it.
    for rel, digest in (meta.get("sha256") or {}).items():  # every format-2 checkpoint has them
        if file_sha256(path / rel) != digest:
            raise CheckpointError(f"{path / rel}: damaged (its sha256 differs from the one saved in "
                                  f"{CONFIG_FILE}: truncated, overwritten or copied incompletely)")
    return meta


def _check_saved_files(path: Path, meta: dict, config) -> None:
    """Before building (after check_files): the JSON files, and the copy of the config saved in
    WEIGHTS_FILE's metadata, agree with the config."""
    cfg_file = path / CONFIG_FILE
    # The saved architecture must be the one the config names (catches swapped/edited folders).
    expected = TINY_TYPES.get(config.backbone)
    if expected is not None:
        found = _read_json(path / BASE_DIR / "config.json").get("model_type")
        if found != expected:
            raise CheckpointError(f"{path / BASE_DIR / 'config.json'}: base is {found!r} but the "
                                  f"checkpoint config names backbone {config.backbone!r} ({expected})")
    if meta.get("model_type") and expected is not None and meta["model_type"] != expected:
        raise CheckpointError(f"{cfg_file}: model_type {meta['model_type']!r} does not match backbone "
                              f"{config.backbone!r}")
    # peft builds the adapter from its own adapter_config.json, so an edited LoRA field in our config
    # would be ignored while it still keys the gallery cache: the two must agree.
    adapter_file = path / ADAPTER_DIR / "adapter_config.json"
    adapter = _read_json(adapter_file)
    for ours, theirs in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        mine = getattr(config, ours)
        if mine is not None and theirs in adapter and adapter[theirs] != mine:
            raise CheckpointError(f"{cfg_file}: {ours}={mine!r} contradicts {adapter_file} "
                                  f"({theirs}={adapter[theirs]!r})")
    _check_config_digest(path, meta)  # last: the checks above name an edit more precisely


def _check_config_digest(path: Path, meta: dict) -> None:
    """The config's computed fields are those saved in WEIGHTS_FILE's metadata (an edited video_size or
    num_frames loads fine and silently changes every embedding); a checkpoint written before the
    metadata existed gets one warning."""
    from safetensors import safe_open

    cfg_file, file = path / CONFIG_FILE, path / WEIGHTS_FILE
    with _reading(file, "weights"):
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
    if META_CONFIG not in metadata:
        warn_once(cfg_file, f"written before config digests (none in {file}'s metadata); its fields are not "
                            f"verified against the weights")
        return
    with _reading(file, "config saved in the metadata of the weights"):
        record = json.loads(metadata[META_CONFIG])
    saved = record.get("config") if isinstance(record, dict) else None
    if not isinstance(saved, dict) or json_sha256(saved) != record.get("sha256"):
        raise CheckpointError(f"{file}: damaged: the config saved in its metadata does not match its sha256")
    now, absent = computed_fields(meta["config"]), "(absent)"
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k, absent) != now.get(k, absent))
    if changed:
        raise CheckpointError(
            f"{cfg_file}: edited after saving: " + ", ".join(f"{k}={now.get(k, absent)!r}" for k in changed)
            + f" differ{'s' if len(changed) == 1 else ''} from the saved value{'s' if len(changed) > 1 else ''} "
            + f"in the metadata of {file} ("
            + ", ".join(f"{k}={saved.get(k, absent)!r}" for k in changed)
            + "), which the model was trained with; put the saved values back")


def _check_built(path: Path, meta: dict, emb) -> None:
    """After building: the backbone, width and pixel budget are the ones the config was saved with."""
    cfg_file = path / CONFIG_FILE
    for field, built in (("model_type", emb.model_type), ("dim", emb.dim)):
        if meta.get(field, built) != built:
            raise CheckpointError(f"{cfg_file}: {field}={meta[field]!r}, but the backbone built from "
                                  f"this checkpoint has {field}={built!r}")
    # The saved image processor resizes every image (it, not the config, is what loading uses); an
    # edited min_pixels / max_pixels would describe a budget the checkpoint does not apply.
    saved = _pixel_budget(emb.image_processor)
    c = emb.config
    if saved != (c.min_pixels, c.max_pixels):
        raise CheckpointError(f"{cfg_file}: min_pixels={c.min_pixels}, max_pixels={c.max_pixels} contradict the "
                              f"saved image processor in {path / PROCESSOR_DIR} (min {saved[0]}, max {saved[1]} "
                              f"pixels per image)")


def _pixel_budget(image_processor) -> tuple:
    """(min_pixels, max_pixels) of a Qwen image processor (transformers 5 names them size's
    shortest_edge / longest_edge, 4 min_pixels / max_pixels); None where unset."""
    size = getattr(image_processor, "size", None)
    out = []
    for keys in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        value = None
        for key in keys:
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            value = value if value is not None else getattr(image_processor, key, None)
            if value is not None:
                break
        out.append(None if value is None else int(value))
    return tuple(out)


def _same_backbone(a: str, b: str) -> bool:
    """Two backbone names mean the same backbone: equal, or the same local folder spelled differently."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def typed_config(config_cls, values, file: Path, error: type = CheckpointError):
    """A `config_cls` dataclass from a saved JSON object `values`, each value checked against its field's
    declared type ("int", "Optional[float]", ...): ints serve float fields, a bool never an int one (JSON
    true is not 1 here). Fields a newer version added are ignored. A wrongly typed value (e.g. an
    edited "batch_size": "16") is one `error` naming `file`, the field and the type, not a TypeError
    deep inside the run."""
    if not isinstance(values, dict):
        raise error(f"{file}: expected a JSON object of config fields, got {type(values).__name__}")
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
    out = {}
    for f in fields(config_cls):
        if f.name not in values:
            continue
        declared = (f.type.__name__ if isinstance(f.type, type) else str(f.type)).replace("typing.", "")
        kind = declared.removeprefix("Optional[").removesuffix("]")  # "int", "float", "str" or "bool"
        value, optional, ok = values[f.name], declared.startswith("Optional["), kinds.get(kind)
        if ok is not None and not (value is None and optional) and (
                not isinstance(value, ok) or (isinstance(value, bool) and kind != "bool")):
            raise error(f"{file}: field {f.name!r} is {json.dumps(value)[:60]} ({type(value).__name__}), "
                        f"expected {kind}{' or null' if optional else ''}")
        out[f.name] = value
    return config_cls(**out)


def _read_json(file: Path) -> dict:
    """A JSON object from a checkpoint file, or CheckpointError naming it."""
    with _reading(file, "JSON file"):
        obj = json.loads(file.read_text())
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as {name: tensor}, or CheckpointError naming it (truncated, garbled)."""
    from safetensors.torch import load_file

    with _reading(file, "weights"):
        return load_file(str(file))


@contextlib.contextmanager
def _reading(file: Path, what: str, error: type = None):
    """Turn any failure to parse a checkpoint or backbone file (JSON, safetensors, tokenizer: each
    library raises its own types) into one `error` (CheckpointError by default) naming the file;
    FashionLens's own errors pass unchanged."""
    try:
        yield
    except FashionLensError:
        raise
    except Exception as e:  # noqa: BLE001 -- third-party parsers; the message keeps their reason
        raise (error or CheckpointError)(f"{file}: cannot load the {what} (damaged, truncated or not this "
                                         f"model's? {type(e).__name__}: {_one_line(e)})") from e


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch's load_state_dict errors span many)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _strip(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix`, with the prefix removed (one sub-module's state dict)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _versions() -> dict:
    """Library versions, saved with each checkpoint so a mismatch can be diagnosed later."""
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "numpy": np.__version__}
