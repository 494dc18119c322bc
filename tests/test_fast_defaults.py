"""Fast defaults: dtype `auto` picks bf16 only where the hardware runs it natively."""

from __future__ import annotations

import os

import torch

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


def test_every_launcher_defaults_to_auto():
    """A CPU with AVX2 alone runs bf16 ~30x slower than fp32: nothing that starts a model picks bf16 on its own."""
    import inspect

    from orchestrator.config import DraftConfig, VerifierConfig
    from orchestrator.launch import start_verifier

    assert VerifierConfig().dtype == DraftConfig(name="d").dtype == "auto"
    assert inspect.signature(start_verifier).parameters["dtype"].default == "auto"


def test_cpu_capability_is_read_from_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert models.cpu_runs_bf16() == bool({"amx_bf16", "avx512_bf16"} & set(flags))
    assert set(models.cpu_matrix_flags()) == set(models.MATRIX_FLAGS) & set(flags)
