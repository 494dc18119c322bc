"""PubMedQA prompts: read PQA-L items from a local file or the Hub, render the template, fit a window.

Template (documented in the README): "Question: {question}\nContext: {passage 1} {passage 2} ...\nAnswer:"
A prompt longer than the allowed number of tokens loses the end of its abstract, never the question or
the "Answer:" cue. Knows nothing about models beyond a tokenize callable.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

ENV_VAR = "SPECDEC_PUBMEDQA"
TEMPLATE = "Question: {question}\nContext: {context}\nAnswer:"
HUB_ID, HUB_CONFIG = "qiaojin/PubMedQA", "pqa_labeled"
DECISIONS = ("yes", "no", "maybe")
_DECISION = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    pubid: str
    question: str
    contexts: tuple[str, ...]
    final_decision: str

    @property
    def prompt(self) -> str:
        return TEMPLATE.format(question=self.question, context=" ".join(self.contexts))


def default_path() -> pathlib.Path | None:
    value = os.environ.get(ENV_VAR)
    return pathlib.Path(value) if value else None


def _from_record(record: dict) -> Item:
    if "context" in record and isinstance(record["context"], dict):  # the Hub's layout
        contexts = record["context"]["contexts"]
    else:
        contexts = record["contexts"]
    return Item(str(record["pubid"]), record["question"], tuple(contexts), record.get("final_decision", ""))


def load_items(path: str | os.PathLike) -> list[Item]:
    """Items from JSONL (the shared copy, or rows in the Hub's layout), the official ori_pqal.json, or parquet."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"PubMedQA file not found: {path} (set {ENV_VAR} or pass a path)")
    if path.suffix == ".parquet":
        import pandas as pd

        return [_from_record(row) for row in pd.read_parquet(path).to_dict("records")]
    text = path.read_text()
    if path.suffix == ".json":  # official ori_pqal.json: {pubid: {QUESTION, CONTEXTS, final_decision, ...}}
        data = json.loads(text)
        return [
            Item(pubid, rec["QUESTION"], tuple(rec["CONTEXTS"]), rec.get("final_decision", ""))
            for pubid, rec in data.items()
        ]
    # split on "\n" only: str.splitlines would also split on U+2028, which occurs inside abstracts
    return [_from_record(json.loads(line)) for line in text.split("\n") if line.strip()]


def load_hub(hub_id: str = HUB_ID, config: str = HUB_CONFIG, split: str = "train") -> list[Item]:
    """Items from the Hugging Face Hub via `datasets` (needs network or a warm HF cache)."""
    import datasets

    try:
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (offline, missing split, ...)
        raise FileNotFoundError(f"cannot load {hub_id} ({config}, split {split}) from the Hub: {exc}") from exc
    return [_from_record(row) for row in rows]


def select(items: list[Item], n: int, seed: int | None) -> list[Item]:
    """n items: a seeded random sample, or the first n in file order when seed is None."""
    if n > len(items):
        raise ValueError(f"asked for {n} prompts but the dataset has {len(items)} items")
    return items[:n] if seed is None else random.Random(seed).sample(items, n)


def encode(item: Item, tokenize: Callable[[str], list[int]], max_tokens: int) -> tuple[list[int], bool]:
    """(prompt ids, truncated): the whole prompt if it fits, else the abstract cut to fit max_tokens."""
    ids = tokenize(item.prompt)
    if len(ids) <= max_tokens:
        return ids, False
    head, _, tail = TEMPLATE.partition("{context}")
    head_ids = tokenize(head.format(question=item.question))
    tail_ids = tokenize(tail)
    room = max_tokens - len(head_ids) - len(tail_ids)
    if room < 1:
        raise ValueError(f"PubMedQA item {item.pubid}: the question alone is longer than {max_tokens} tokens")
    return head_ids + tokenize(" ".join(item.contexts))[:room] + tail_ids, True


def parse_decision(text: str) -> str | None:
    """The answer a generated text gives: the first standalone "yes", "no" or "maybe" in it (any case), or None.

    "Yes, insulin ..." -> "yes"; "The answer is: maybe." -> "maybe"; "Noted." -> None (not a whole word).
    """
    match = _DECISION.search(text)
    return match.group(1).lower() if match else None
