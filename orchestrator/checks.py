"""Checks that refuse a benchmark run before any request is sent, each with a message that says what to fix.

`check_limits` compares the run with the limits the verifier announces in Info; `check_resume` keeps --resume
from mixing results of a different model, sampling, length or dataset into one run folder.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from orchestrator.config import BenchConfig, RunSpec


class BenchError(RuntimeError):
    """The benchmark cannot run as configured; the message says what to fix."""


def check_limits(config: BenchConfig, specs: list[RunSpec], limits) -> None:
    """Refuse, before any request, a run the verifier would refuse request by request."""
    gammas = [s.gamma for s in specs if isinstance(s.gamma, int)]
    problems = []
    if gammas and max(gammas) > limits.max_gamma:
        problems.append(f"gamma {max(gammas)} is over the verifier's max_gamma {limits.max_gamma}")
    if config.max_new_tokens > limits.max_new_tokens:
        problems.append(f"max_new_tokens {config.max_new_tokens} is over the verifier's limit {limits.max_new_tokens}")
    sessions = max(config.concurrency.levels())
    per_client = limits.max_sessions_per_client or limits.max_sessions
    if sessions > min(limits.max_sessions, per_client):
        problems.append(f"concurrency: {sessions} sessions is over the verifier's limit of "
                        f"{min(limits.max_sessions, per_client)} (max_sessions / max_sessions_per_client)")
    if problems:
        raise BenchError("; ".join(problems))


def check_resume(out: pathlib.Path, config: BenchConfig) -> None:
    """--resume must not mix results of a different model, sampling, length or dataset into one run."""
    path = out / "run.json"
    if not path.exists():
        return
    def what_matters(c: dict) -> dict:
        return {"verifier": {f: c["verifier"][f] for f in ("model", "dtype")},
                **{k: c[k] for k in ("drafts", "tokenizer", "sampling", "max_new_tokens", "ignore_eos", "dataset")},
                "prompt_format": c.get("prompt_format", "raw")}

    before = what_matters(json.loads(path.read_text())["config"])
    now = what_matters(json.loads(json.dumps(dataclasses.asdict(config))))
    changed = [k for k in now if before[k] != now[k]]
    if changed:
        raise BenchError(f"--resume with a config that changed {', '.join(changed)} since {path}; use a new --out")
