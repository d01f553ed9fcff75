"""Shared fixtures. Every model is built locally from config classes; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture
def tiny_llava():
    """``(model, processor)``: a 2-layer, 4-head MHA LLaVA with a word-level tokenizer."""
    from hsr_pl.models.tiny import build_tiny

    return build_tiny("llava", gqa=False)


@pytest.fixture
def tiny_llava_gqa():
    from hsr_pl.models.tiny import build_tiny

    return build_tiny("llava", gqa=True)


def require_torchao():
    """torchao for the cross-checks (the ``xcheck`` extra): skipped where it is not installed, but
    CI (``HSR_REQUIRE_XCHECK=1``, set by .ci/run, which installs the extra) fails instead of skipping."""
    if os.environ.get("HSR_REQUIRE_XCHECK"):
        import torchao

        return torchao
    return pytest.importorskip("torchao", reason="the torchao cross-check needs the xcheck extra")
