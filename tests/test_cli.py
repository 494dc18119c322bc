"""The `specdec` CLI as a user runs it: serve-verifier in one process, generate in others (tiny models)."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator.launch import start_verifier
from specdec.tiny import build_tiny_pair
from tests.stubs import CLI, ENV

pytestmark = pytest.mark.slow  # the specdec CLI in subprocesses

PROMPT = "Insulin is a peptide hormone produced by the beta cells of the pancreatic islets."


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    draft, verifier = tiny_dirs
    process = start_verifier(str(verifier), "fp32", "cpu", env=ENV)
    assert process.address.startswith("127.0.0.1:")
    yield process.address, draft, verifier, tmp_path_factory
    process.stop()


def generate(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "generate", "--verifier", address, "--prompt", PROMPT, "--max-new-tokens", "24",
                           "--ignore-eos", "--json", *args], capture_output=True, text=True, env=ENV, timeout=300)


def test_generate_modes_agree(served):
    address, draft, verifier, _ = served
    outputs = {}
    for name, args in {"baseline": ["--baseline", "--tokenizer", str(verifier)],
                       "lm": ["--draft", str(draft), "--gamma", "3"],  # the default mode (lockstep)
                       "lm async": ["--draft", str(draft), "--gamma", "3", "--mode", "async"],
                       "ngram": ["--drafter", "ngram", "--tokenizer", str(verifier)]}.items():
        done = generate(address, *args)
        assert done.returncode == 0, done.stderr
        outputs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for out in outputs.values():
        assert {"text", "token_ids", "new_tokens", "wall_s", "rounds", "proposed", "accepted", "acceptance_rate"} <= out.keys()
        assert out["token_ids"] == outputs["baseline"]["token_ids"] and out["new_tokens"] == 24
        assert out["finish_reason"] == "length" and out["text"] and out["bytes_received"] > 0
        assert 0 < out["ttft_s"] <= out["wall_s"]
    assert outputs["lm"]["rounds"] < 24 and outputs["lm"]["accepted"] > 0
    assert outputs["lm async"]["mode"] == "async" and outputs["lm"]["mode"] == "lockstep"
    assert len(outputs["lm"]["service_s"]) == outputs["lm"]["rounds"]
    assert outputs["baseline"]["service_s"] and all(s > 0 for s in outputs["baseline"]["service_s"])  # the streamed replies


def test_ngram_defaults_to_the_verifiers_tokenizer(served):
    address, *_ = served
    done = generate(address, "--drafter", "ngram")  # Info's model_id is the verifier's folder, loadable here
    assert done.returncode == 0, done.stderr


def test_tokenizer_mismatch_is_refused_naming_both_models(served):
    address, _, verifier, factory = served
    other_draft, _ = build_tiny_pair(factory.mktemp("other"), vocab_size=400)
    done = generate(address, "--draft", str(other_draft))
    assert done.returncode == 1
    assert "tokenizer mismatch" in done.stderr and str(other_draft) in done.stderr and str(verifier) in done.stderr
    assert "Traceback" not in done.stderr


def test_unreachable_verifier_is_one_clear_line():
    done = subprocess.run([*CLI, "generate", "--verifier", "127.0.0.1:1", "--drafter", "ngram", "--prompt", "x",
                           "--timeout", "5"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1
    assert "cannot reach the verifier at 127.0.0.1:1" in done.stderr and "Traceback" not in done.stderr


def test_bad_arguments_are_user_errors(served):
    address, draft, *_ = served
    done = generate(address, "--draft", str(draft), "--temperature", "-1")
    assert done.returncode == 1 and "temperature" in done.stderr and "Traceback" not in done.stderr
    done = generate(address, "--draft", str(draft), "--gamma", "999")
    assert done.returncode == 1 and "gamma" in done.stderr
    done = subprocess.run([*CLI, "serve-verifier", "--model", "/nonexistent/model", "--port", "0"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1 and "/nonexistent/model" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([*CLI, "serve-verifier", "--model", str(draft), "--port", "0", "--max-batch-tokens", "4"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1 and "max_batch_tokens (4) must hold one block" in done.stderr and "Traceback" not in done.stderr
