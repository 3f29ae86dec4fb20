"""Every constant the method depends on, written out as literals beside the source it was read from
(issue 30, item 1). tests/test_pins.py holds the code to these; other tests read them instead of the
tables they check (a test that reads support/recipes.py to check support/recipes.py cannot fail).

Not a test module (no test_ prefix). Sources:
* "authors' F N": the authors' code, github haokunwen/FashionLens `code/` at 3e470f0, file F line N
  (docs/FIDELITY.md, "The two recipes", maps each `paper` value to its line; every line here was re-read).
* "FIDELITY <table>, <row>": a documented departure of ours, docs/FIDELITY.md.
* "RESULTS <heading>": the measurement that chose a value, docs/RESULTS.md.
* "README flags": the flag table of README.md ("flag | default | meaning").
Changing a value here means changing its source first (a new measurement, a new FIDELITY row).
"""

# ------------------------------------------------------------------------------------------------
# support/recipes.py RECIPES["paper"]: the authors' values
# ------------------------------------------------------------------------------------------------
PAPER_EMBEDDER = {
    # authors' evaluate.py 133 / test.py 150: FashionCollator(min_pixel=224*224, max_pixel=256*256). At
    # training they used 224*224 for both (train.py 84); ours keeps 224^2..256^2 there too: FIDELITY
    # "Every departure", row "image pixel budget at training".
    "min_pixels": 224 * 224,
    "max_pixels": 256 * 256,  # authors' evaluate.py 133, test.py 150
    # authors' evaluate.py 54: query_image[0:8] at validation; training keeps all (dataset.py 54-57), ours
    # the first 8 everywhere: FIDELITY "Every departure", rows "query images at training" / "at test".
    "max_query_images": 8,
    "query_sketches": "all",  # authors' dataset.py 351-354: every query image appended to one prompt
    "num_frames": 8,  # authors' dataset.py 362: 'nframes': 8
    "video_size": 224,  # authors' dataset.py 362: "resized_height": 224, "resized_width": 224
    "lora_dropout": 0.05,  # authors' model.py 134: LoraConfig(lora_dropout = 0.05)
    "summary_init": "im_end",  # authors' model.py 148-155: both learnable tokens cloned from <|im_end|>
}
# EmbedderConfig fields TrainConfig does not pass (RECIPES[...]["forward"]): how the backbone and the
# calibrator compute (issue 31, item 0).
PAPER_FORWARD = {
    # authors' model.py 183-192 and 216-223: self.qwen.model.rope_deltas = None, then self.qwen.model(
    # inputs_embeds=..., attention_mask=..., pixel_values=..., image_grid_thw=...) with no input_ids and no
    # position_ids, on Qwen3VLForConditionalGeneration (model.py 107); "authors" = those positions on Qwen3-VL
    # (sequential), Qwen's mRoPE on backbones they did not train (FIDELITY "Every departure", row
    # "positions of the tokens").
    "positions": "authors",
    # authors' model.py 36: torch.clamp(dot, -0.9995, 0.9995); 43-44: / (sin_omega + 1e-8); 46-53: returned
    # without normalising.
    "slerp_edge": "authors",
}
PAPER_TRAIN = {
    "lr": 1e-4,  # authors' train.py 336: --lr 1e-4
    "weight_decay": 1e-3,  # authors' train.py 337: --weight_decay 1e-3
    "lr_schedule": "constant",  # authors' train.py 101: AdamW alone, no scheduler anywhere in train.py
    "warmup_ratio": 0.0,  # (no scheduler: no warm-up either)
    "grad_clip": 0.0,  # authors' train.py: no clip_grad call anywhere (FIDELITY "The two recipes": none)
    "batch_size": 64,  # authors' train.py 330: --batch_size 64 (per GPU; ours is global, one GPU = 64)
    "chunk_size": -1,  # -1 = the per-sub-dataset table below (authors' train.py 29-48, used at 169)
    "eval_every": 500,  # authors' train.py 334: --eval_steps 500
    "epochs": 5.0,  # authors' train.py 335: --epochs 5
    "positives": "single",  # authors' my_grad_cache.py 48: target = torch.arange(0, x.size(0))
    "ggas_refresh": "epoch",  # authors' dataset.py 248-250: set_epoch -> recompute_probabilities
    "ggas_ema_start": "zero",  # authors' dataset.py 137: task_difficulties = [0.0] * num_datasets
    "ggas_floor": "renorm",  # authors' dataset.py 241-246: max(p, min_prob), one renormalisation
    "reg_per_chunk": True,  # authors' my_grad_cache.py 260: reg_loss added in every chunk's backward
}

# The authors' GradCache chunk per sub-dataset, authors' train.py 29-48 (train_files_chunk_size; the
# key 'N_task_Dataset_train_triplet_data.json' is our "task/Dataset"). Line of each entry:
CHUNK_SIZES = {
    "t2i/FashionGen": 8,  # train.py 30
    "t2i/Shoes": 32,  # train.py 31
    "sketch2i/ClothesV1": 16,  # train.py 32
    "sketch2i/HAIFashion": 16,  # train.py 33
    "sketch2i/QMUL-Shoe-V2": 16,  # train.py 34
    "inshop/DeepFashion": 8,  # train.py 35
    "street2shop/DeepFashion2": 8,  # train.py 36
    "compatibility/FashionVC": 32,  # train.py 37
    "compatibility/Polyvore": 8,  # train.py 38
    "video2img/MovingFashion": 2,  # train.py 39
    "cir/Fashion200K": 8,  # train.py 40
    "cir/FashionIQ-Dress": 32,  # train.py 41
    "cir/FashionIQ-Shirt": 32,  # train.py 42
    "cir/FashionIQ-Toptee": 32,  # train.py 43
    "cir/Shoes": 32,  # train.py 44
    "sketch&text/CSTBIR": 32,  # train.py 45
    "asfr/DARN": 4,  # train.py 46
    "asfr/FashionAI": 4,  # train.py 47
}
# A sub-dataset the authors' table does not list (the synthetic ones): ours, FIDELITY "The two
# recipes", row "GradCache chunk" ("a sub-dataset it does not list: 8"). The authors have no such case.
DEFAULT_CHUNK_SIZE = 8
# Query images sampled from one training record: authors' dataset.py 12-31 (num_constrains, first
# number; 0 = keep all), lines 15 and 17 are the only non-zero ones; applied at dataset.py 54-57.
TRAIN_QUERY_IMAGE_CAP = {"sketch2i/ClothesV1": 5, "sketch2i/QMUL-Shoe-V2": 5}

# ------------------------------------------------------------------------------------------------
# support/recipes.py RECIPES["tiny-cpu"]: ours, each value with the place that chose it
# ------------------------------------------------------------------------------------------------
TINY_EMBEDDER = {
    "min_pixels": 64 * 64,  # FIDELITY 'Why each config value', min_pixels/max_pixels: tiny-cpu 64^2..64^2
    "max_pixels": 64 * 64,  # (the synthetic images are 64 x 64)
    # FIDELITY 'Why each config value', row max_query_images/query_sketches/num_frames/video_size:
    # "tiny-cpu 4 / one / 4 / 64"; one sketch: also FIDELITY "Every departure", "sketches in tiny-cpu".
    "max_query_images": 4,
    "query_sketches": "one",
    "num_frames": 4,
    "video_size": 64,
    "lora_dropout": 0.0,  # RESULTS "Why the defaults are what they are", lora_dropout (30 % of a step)
    "summary_init": "words",  # FIDELITY "Departures of `tiny-cpu` measured on the tiny model"
}
TINY_FORWARD = {
    "positions": "mrope",  # FIDELITY 'Why each config value', positions: "tiny-cpu mrope" (the default job unchanged)
    "slerp_edge": "exact",  # FIDELITY 'Why each config value', slerp_edge: "tiny-cpu exact"
}
TINY_TRAIN = {
    "lr": 1e-3,  # RESULTS "Why the defaults are what they are": "lr = 1e-3, not 3e-3"
    "weight_decay": 0.0,  # FIDELITY 'Why each config value', weight_decay: "tiny-cpu 0"
    "lr_schedule": "cosine",  # FIDELITY 'Why each config value', lr_schedule: "tiny-cpu cosine"
    "warmup_ratio": 0.05,  # FIDELITY 'Why each config value', warmup_ratio: "tiny-cpu 0.05"
    "grad_clip": 1.0,  # FIDELITY 'Why each config value', grad_clip: "tiny-cpu 1.0"
    "batch_size": 16,  # RESULTS "Why the defaults are what they are": "batch_size = 16, not 32"
    "chunk_size": 16,  # FIDELITY 'Why each config value', chunk_size: "tiny-cpu's 16 of 16" (one chunk)
    "eval_every": 200,  # RESULTS "Why the defaults are what they are": "eval_every = 200"
    "steps": 1400,  # RESULTS "Why the defaults are what they are": "steps = 1400, not 600"
    "positives": "multi",  # FIDELITY 'Why each config value', positives: "tiny-cpu multi"
    "ggas_refresh": "step",  # FIDELITY 'Why each config value', ggas_refresh: "tiny-cpu step"
    "ggas_ema_start": "first",  # FIDELITY 'Why each config value', ggas_ema_start: "tiny-cpu first"
    "ggas_floor": "waterfill",  # FIDELITY 'Why each config value', ggas_floor: "tiny-cpu waterfill"
    "reg_per_chunk": False,  # FIDELITY 'Why each config value', reg_per_chunk: "tiny-cpu once per batch"
}
# The run length a recipe gives when neither --steps nor --epochs is: (steps, epochs); the other of
# the pair is 0 (support/recipes.py resolve_train_config; FIDELITY 'Why each config value', steps/epochs).
RUN_LENGTH = {"paper": (0, 5.0), "tiny-cpu": (1400, 0.0)}

# ------------------------------------------------------------------------------------------------
# Concept defaults that no recipe sets
# ------------------------------------------------------------------------------------------------
# PGSQC (calibrator.py: CalibratorConfig and SphericalQueryCalibrator.__init__; model.py builds the
# calibrator with rank, hidden and mode only, so the others reach training from these defaults).
CALIBRATOR = {
    "rank": 32,  # authors' model.py 126: SphericalHyperAdapter(emb_dim=2560, rank=32)
    "hidden": 512,  # authors' model.py 17: nn.Linear(emb_dim, 512)
    "mode": "slerp",  # authors' model.py 30: slerp (README flags: --calibrator slerp)
    "fro_weight": 1e-4,  # authors' my_grad_cache.py 117: lambda_fro = 1e-4 (train.py 93-99 keeps it)
    "orth_weight": 1e-2,  # authors' my_grad_cache.py 118: lambda_orth = 1e-2
    "init_logit": -3.0,  # authors' model.py 28: last_layer.bias[-1] = -3.0
    "init_std": 1e-6,  # authors' model.py 25: nn.init.normal_(last_layer.weight, std=1e-6)
    # None = sqrt(machine eps) of the dtype (calibrator.py _default_eps): ours, FIDELITY "Every
    # departure", row "slerp near q and near -q" (the authors clamp cos to +-0.9995, model.py 36).
    "eps": None,
    # "exact" = calibrator.slerp: ours, FIDELITY "Every departure", row "slerp near q and near -q"; the
    # `paper` recipe passes "authors" (PAPER_FORWARD["slerp_edge"]).
    "slerp_edge": "exact",
}
# GGAS (sampler.py: SamplerConfig and TaskBatchSampler.__init__; train.make_sampler passes strategy,
# warm-up, refresh, ema_start, floor and seed, so lam/temperature/ema/min_prob/refresh_every/drop_last
# reach training from these defaults).
SAMPLER = {
    "strategy": "ggas",  # authors' dataset.py 201 set_adaptive_mode (README flags: --sampler ggas)
    "lam": 0.5,  # authors' train.py 349: --adaptive_lam 0.5 (dataset.py 100)
    "temperature": 1.0,  # authors' train.py 350: --adaptive_temp 1.0 (dataset.py 101)
    "ema": 0.9,  # authors' train.py 348: --adaptive_alpha 0.9 (dataset.py 99, used at 213)
    "min_prob": 0.02,  # authors' train.py 344: --adaptive_min_prob 0.02 (dataset.py 102)
    "warmup_steps": None,  # None = one epoch: authors' train.py 347, --adaptive_warmup_epochs 1
    "refresh": "step",  # ours = tiny-cpu's: FIDELITY 'Why each config value', ggas_refresh
    "refresh_every": 1,  # ours, no doc beyond sampler.py's comment: with refresh "step", every step
    "ema_start": "first",  # ours = tiny-cpu's: FIDELITY 'Why each config value', ggas_ema_start
    "floor": "waterfill",  # ours = tiny-cpu's: FIDELITY 'Why each config value', ggas_floor
    "seed": 0,  # README flags: --seed 0
    "drop_last": True,  # authors' train.py 113: drop_last=True (FIDELITY "Every departure", batch boundaries)
}
# EmbedderConfig (model.py) fields no recipe sets that change what is computed.
EMBEDDER = {
    "backbone": "tiny",  # README flags: --backbone tiny
    "seed": 0,  # README flags: --seed 0
    "recipe": "auto",  # README flags: --recipe auto (FIDELITY "The two recipes")
    "lora_r": 8,  # authors' model.py 132: r = 8
    "lora_alpha": 16,  # authors' model.py 133: lora_alpha = 16
    "calibrator": "slerp",  # authors' model.py 30 (README flags: --calibrator slerp)
    "calibrator_rank": 32,  # authors' model.py 126: rank=32
    "calibrator_hidden": 512,  # authors' model.py 17: nn.Linear(emb_dim, 512)
    "dtype": "auto",  # FIDELITY "Every departure", precision: float32 on CPU, bf16 backbone on a GPU
    "attn_implementation": "sdpa",  # FIDELITY "Every departure", what the backbone runs: SDPA
    "train_vision": "auto",  # FIDELITY 'Why each config value', train_vision: train a tiny tower, freeze a real one
}
# TrainConfig (train.py) fields no recipe sets that change what is computed.
TRAIN = {
    "tasks": "all",  # README flags: --tasks all
    "data": "synthetic",  # README flags: --data synthetic
    "backbone": "tiny",  # README flags: --backbone tiny
    "recipe": "auto",  # README flags: --recipe auto
    "vision_lr_scale": 0.1,  # RESULTS "Why the defaults are what they are": "vision_lr_scale = 0.1"
    "min_lr_ratio": 0.05,  # FIDELITY 'Why each config value', min_lr_ratio: "the cosine ends at lr x 0.05"
    "temperature": 0.07,  # authors' train.py 338: --temperature 0.07 (my_grad_cache.py 49 divides by it)
    "calibrator": "slerp",  # README flags: --calibrator slerp
    "sampler": "ggas",  # README flags: --sampler ggas
    "ggas_warmup": -1,  # one epoch: authors' train.py 347; capped at steps/4: RESULTS "Why the defaults", ggas_warmup
    "max_eval_queries": 0,  # 0 = every query: FIDELITY "Every departure", Recall@K "hits / all queries"
    "seed": 0,  # README flags: --seed 0
}
# The linear layers LoRA wraps (model.py _add_lora, the language model's only): authors' model.py 131,
# target_modules = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].
LORA_TARGETS = {"q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# evaluate.py DEFAULT_KS: authors' evaluate.py 422 and test.py 416, k_values=[1, 5, 10, 50].
RECALL_KS = (1, 5, 10, 50)

# Fields left unpinned on purpose: how and where a run executes, not what it computes (tested where
# they act), or a value no document chose (UNSOURCED: a source is not invented here; give it one in
# docs/ and move it to the pins above).
ENGINEERING = {
    "EmbedderConfig": {"device"},
    "TrainConfig": {"out", "eval_batch_size", "final_test", "device", "cpu_threads", "loader", "two_cores",
                    "stop_at", "find_unused_parameters"},
}
UNSOURCED = {
    "EmbedderConfig": {"tiny_vocab_size"},  # 1536: the offline tokenizer's BPE size; no doc says why
    "SamplerConfig": {"batch_size"},  # 32: train.py always passes its own batch size
}
