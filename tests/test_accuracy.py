"""PubMedQA answers scored: the yes/no/maybe parse on fixed texts, chat-formatted bench prompts, and the report's
accuracy columns computed from fixed records (no Ray, no models beyond the tiny tokenizer)."""

from __future__ import annotations

import pandas as pd
import pytest

from orchestrator import bench, report
from specdec import models
from specdec.metrics import GenerationResult
from specdec.pubmedqa import Item, parse_decision


@pytest.mark.parametrize("text, decision", [
    (" Yes, insulin lowers blood glucose.", "yes"),
    ("no. The trial found no effect.", "no"),
    ("The answer is: Maybe, the evidence is mixed.", "maybe"),
    ("\nMAYBE", "maybe"),
    (" Noted: the results are mixed", None),  # "no" only as part of a word
    ("Yesterday the patients were nominated", None),
    ("", None),
    ("It is not clear; no.", "no"),
])
def test_parse_decision(text, decision):
    assert parse_decision(text) == decision


def test_chat_prompts_wrap_the_cut_raw_prompt(tiny_dirs):
    tokenizer = models.load_tokenizer(str(tiny_dirs[1]))
    items = [Item("1", "Does insulin lower glucose?", ("Insulin is a peptide hormone. " * 40,), "yes")]
    raw = bench.encode_prompts(items, tokenizer, 120)[0]
    chat = bench.encode_prompts(items, tokenizer, 120, "chat")[0]
    assert raw.final_decision == chat.final_decision == "yes" and raw.truncated and chat.truncated
    assert len(raw.ids) <= 120 and len(chat.ids) <= 120 and len(chat.ids) > 100
    text = tokenizer.decode(chat.ids)
    assert text.startswith("<|im_start|>user\nQuestion: Does insulin lower glucose?")
    assert text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")


def _record(config: str, drafter: str, pubid: str, text: str, final: str) -> dict:
    result = GenerationResult(token_ids=[5, 6, 7], text=text, wall_s=1.0, ttft_s=0.1, finish_reason="length",
                              rounds=1 if drafter != "baseline" else 0, proposed_per_round=[2] if drafter != "baseline" else [],
                              accepted_per_round=[2] if drafter != "baseline" else [], rtt_s=[0.01] if drafter != "baseline" else [],
                              service_s=[0.005])
    decision = parse_decision(text)
    return {**result.to_dict(), "config": config, "drafter": drafter, "draft_name": config, "draft_model": None,
            "gamma": 2, "rtt_ms": 0.0, "sessions": 1, "pubid": pubid, "prompt_tokens": 9, "prompt_truncated": False,
            "status": "ok", "attempts": 1, "error": "", "started_at": 0.0, "finished_at": 1.0,
            "decision": decision, "final_decision": final, "correct": decision == final}


def test_report_has_accuracy_next_to_the_baselines():
    answers = {"baseline": ["Yes.", "no", "maybe so"], "lm g=2": ["Yes.", "yes", "maybe so"]}
    finals = ["yes", "no", "no"]
    records = pd.DataFrame([_record(config, "baseline" if config == "baseline" else "lm", str(i), text, finals[i])
                            for config, texts in answers.items() for i, text in enumerate(texts)])
    run = {"config": {"prices": {"verifier_per_hour": 1.0, "draft_per_hour": 0.0},
                      "concurrency": {"draft_workers": 1, "sessions_per_worker": 1}},
           "configurations": list(answers)}
    rows = {row["config"]: row for row in report.summarize(records, run).to_dict("records")}
    assert rows["baseline"]["accuracy"] == pytest.approx(2 / 3) and rows["lm g=2"]["accuracy"] == pytest.approx(1 / 3)
    assert rows["lm g=2"]["accuracy_baseline"] == pytest.approx(2 / 3)
    assert rows["lm g=2"]["accuracy_gap"] == pytest.approx(-1 / 3)
    table = report.markdown_table(report.summarize(records, run), report.DETAIL_COLUMNS)
    assert "PubMedQA accuracy | baseline accuracy" in table
