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


def test_cpu_capability_is_read_from_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    assert models.cpu_runs_bf16() == bool({"amx_bf16", "avx512_bf16"} & set(flags))
