"""PubMedQA prompts: read PQA-L items from a local file and render the prompt template.

Template (documented in the README): "Question: {question}\nContext: {passage 1} {passage 2} ...\nAnswer:"
Knows nothing about models; truncation to a model's window is done by the caller on token ids.
Loading from the Hub (`qiaojin/PubMedQA` via `datasets`) is not here yet: it comes with the benchmark.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

ENV_VAR = "SPECDEC_PUBMEDQA"
TEMPLATE = "Question: {question}\nContext: {context}\nAnswer:"


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
