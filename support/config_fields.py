"""Allowed values written next to each config field, and the one checker that reads them (support code:
skip on first read).

A concept file's config dataclass declares a field with `knob`, so the values a field accepts sit on
the same line as the field and its one-line comment:

    lr: Optional[float] = knob(None, "> 0")                 # peak AdamW learning rate
    max_query_images: Optional[int] = knob(None, ">= 0; 0 = all")
    lr_schedule: Optional[str] = knob(None, "constant | cosine")

The rule language is small on purpose (a reader should not need this file to read a rule):

    "> a", ">= a", "< a", "<= a"   a finite number past that bound (bool is not a number)
    "[a, b]", "[a, b)"              a finite number in that interval
    "x | y | z"                     exactly one of those strings (no spaces inside a choice)
    "bool"                          True or False
    "any"                           no rule (free text: a path, a hub id, a device checked elsewhere)

Text after ";" is a note that the error message repeats ("must be >= 0 (0 = all)"). A rule's number
may be the name of another field (">= min_pixels"), compared with that field's value. NaN fails every
bound (every comparison with NaN is false), and infinities fail every numeric rule.

`check_fields(cfg, flag)` checks every field of a dataclass instance and raises one FlagError (or the
error type asked for) naming the first bad field; `rules(cls)` lists them; a test checks that every
field of every concept config has one (tests/test_layout.py).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

from support.errors import FlagError

_CMP = re.compile(r"^(>=|<=|>|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^\[\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


def knob(default: Any, allowed: str, **kw) -> Any:
    """A dataclass field with its allowed values in `metadata["allowed"]` (the rule language above)."""
    _parse(allowed)  # a typo in a rule fails when the class is defined, not when a run starts
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"allowed": allowed}, **kw)
    return dataclasses.field(default=default, metadata={"allowed": allowed}, **kw)


def rules(cls) -> dict[str, str]:
    """Field name -> its rule string, for every field of the dataclass `cls` ('' where none is given)."""
    return {f.name: f.metadata.get("allowed", "") for f in dataclasses.fields(cls)}


def choices_of(cls) -> dict[str, list[str]]:
    """Field -> its allowed strings, for every field of the dataclass `cls` whose rule is a choice."""
    return {k: [c.strip() for c in r.partition(";")[0].split("|")] for k, r in rules(cls).items() if "|" in r}


def _parse(allowed: str) -> tuple[str, str]:
    """Split a rule into (rule, note) and refuse a rule the language does not have."""
    rule, _, note = allowed.partition(";")
    rule, note = rule.strip(), note.strip()
    if not (rule in ("any", "bool") or _CMP.match(rule) or _INTERVAL.match(rule) or "|" in rule
            or re.fullmatch(r"[\w.:-]+", rule)):
        raise ValueError(f"config rule {allowed!r}: not in the rule language (support/config_fields.py)")
    return rule, note


def _number(text: str, cfg) -> float:
    """A rule's bound: a literal number, or the value of another field of the same config."""
    try:
        return float(text)
    except ValueError:
        return float(getattr(cfg, text))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def problem(value, allowed: str, cfg=None) -> str:
    """'' when `value` obeys `allowed`, else what it must be ("must be >= 1 (0 = all)")."""
    rule, note = _parse(allowed)
    tail = f" ({note})" if note else ""
    if rule == "any":
        return ""
    if rule == "bool":
        return "" if isinstance(value, bool) else "must be true or false" + tail
    if "|" in rule or re.fullmatch(r"[\w.:-]+", rule):  # a choice among strings
        choices = [c.strip() for c in rule.split("|")]
        return "" if value in choices else f"must be one of {', '.join(choices)}" + tail
    if not _is_number(value) or not math.isfinite(value):
        return f"must be a finite number {rule}" + tail
    m = _CMP.match(rule)
    if m:
        op, bound = m.group(1), _number(m.group(2), cfg)
        ok = {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
        shown = m.group(2) if not m.group(2)[0].isalpha() else f"{m.group(2)} ({bound:g})"
        return "" if ok else f"must be {op} {shown}" + tail
    m = _INTERVAL.match(rule)
    lo, hi = _number(m.group(1), cfg), _number(m.group(2), cfg)
    ok = lo <= value <= hi if m.group(3) == "]" else lo <= value < hi
    return "" if ok else f"must be in {rule}" + tail


def check_fields(cfg, name_of: Callable[[str], str] = lambda n: f"--{n.replace('_', '-')}",
                 error: type = FlagError, skip_none: bool = True) -> None:
    """Check every field of the dataclass instance `cfg` against its rule; raise `error` for the first
    bad one as "NAME VALUE: must be ..." (NAME from `name_of`: a flag by default). None is skipped when
    `skip_none` (a recipe fills it later)."""
    for f in dataclasses.fields(cfg):
        allowed = f.metadata.get("allowed")
        value = getattr(cfg, f.name)
        if allowed is None or (value is None and skip_none):
            continue
        need = problem(value, allowed, cfg)
        if need:
            raise error(f"{name_of(f.name)} {value!r}: {need}")
