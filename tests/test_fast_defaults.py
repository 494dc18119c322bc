"""Fast defaults: dtype `auto` picks bf16 only where the hardware runs it natively, and a local .gguf's tokenizer
is read from the GGUF once, then from the cache (until the file changes)."""

from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer

from draft_worker.drafters import DrafterSpec
from specdec import models


def test_dtype_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(models, "cpu_runs_bf16", lambda: True)
    assert models.parse_dtype("auto") == torch.bfloat16 == models.parse_dtype("auto", torch.device("cpu"))
    monkeypatch.setattr(models, "cpu_runs_bf16", lambda: False)
    assert models.parse_dtype("auto") == torch.float32
    assert models.parse_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.parse_dtype("auto", torch.device("mps")) == torch.float32
    assert models.parse_dtype("fp32") == torch.float32 and DrafterSpec().dtype == "auto"


def test_cpu_capability_is_read_from_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert models.cpu_runs_bf16() == bool({"amx_bf16", "avx512_bf16"} & set(flags))


def test_gguf_tokenizer_is_cached(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    real = AutoTokenizer.from_pretrained
    reads = []

    def from_pretrained(location, *args, gguf_file=None, **kwargs):
        if gguf_file:  # reading the GGUF: stands in for the 13 s parse of a real one
            reads.append(gguf_file)
            return real(str(tiny_dirs[1]))
        return real(location, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    first = models.load_tokenizer(str(gguf))
    second = models.load_tokenizer(str(gguf))
    assert reads == ["model.gguf"]
    assert models.tokenizer_fingerprint(first) == models.tokenizer_fingerprint(second)
    os.utime(gguf, ns=(1, 1))  # the file changed: read it again
    models.load_tokenizer(str(gguf))
    assert len(reads) == 2
