"""The shipped organism as a bench for realignment variants (used by benchmarks/realign.py).

Everything that does not depend on the variant is computed once: the dense evaluation, the Ships
head scores of the dense model (KL averaged over the refusal, as configs/organism_heads.yaml), the
dense importance statistics, the Wanda-pruned weights and masks. Each variant then starts from the
same pruned weights and masks, realigns, and is evaluated on the same held-out sets.
"""

from __future__ import annotations

import copy

import torch

from hsr_pl.attribution import ScoreConfig, head_scores, top_heads
from hsr_pl.data import SyntheticDataModule
from hsr_pl.evaluation.runner import evaluate
from hsr_pl.models import get_adapter
from hsr_pl.module import LVLMModule
from hsr_pl.pruning import PruningConfig, prune_model
from hsr_pl.realign import RealignConfig, dense_pass, realign_model
from hsr_pl.state import HSRState

REFUSAL = "i am sorry i can not help with that"
SAFETY = "safety+over_refusal"  # image-borne and text-borne refusals


def _tensors(loader):
    return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in loader]


class OrganismBench:
    def __init__(self, judges, top_h: int = 4, calib: int = 128) -> None:
        torch.manual_seed(0)
        self.module = LVLMModule("organism", max_new_tokens=12, judges=list(judges), refusal=REFUSAL)
        self.module.configure_model()
        self.model = self.module.model.eval()
        self.adapter = get_adapter(self.model)
        self.data = SyntheticDataModule(seed=0, eval_batch_size=150, processor=self.module.processor)
        self.data.setup("validate")
        self.loaders = self.data.val_dataloader()
        self.dense_weights = copy.deepcopy(self.model.state_dict())
        self.calib = calib
        self.utility = _tensors(self.data.calibration_dataloader("utility", calib, with_response=True, batch_size=1))
        self.safety = _tensors(self.data.calibration_dataloader(SAFETY, calib, with_response=True, batch_size=16))
        prompts = _tensors(self.data.calibration_dataloader(SAFETY, calib, with_response=True, batch_size=16))
        self.scores = head_scores(self.model, prompts, ScoreConfig(score="kl", positions="response"), engine="exact")
        self.heads = top_heads(self.scores, top_h)
        self.dense_stats = None
        self.pruned_weights = None
        self.pruned_state: HSRState | None = None
        self.state = HSRState()

    def evaluate_current(self) -> dict:
        return evaluate(self.module, self.loaders)

    def evaluate_dense(self) -> dict:
        self.model.load_state_dict(self.dense_weights)
        return self.evaluate_current()

    def prune(self, sparsity: float) -> None:
        self.model.load_state_dict(self.dense_weights)
        self.dense_stats = dense_pass(self.model, self.adapter, "wanda", self.utility, self.safety)
        result = prune_model(self.model, self.utility, PruningConfig(method="wanda", sparsity=sparsity),
                             keep_originals=[n for n in self.adapter.target_linears() if "self_attn" in n])
        state = HSRState()
        for name, mask in result.masks.items():
            state.record_pruning(name, mask, result.originals.get(name))
        state.sparsity, state.method = sparsity, "wanda"
        self.pruned_state = state
        self.pruned_weights = copy.deepcopy(self.model.state_dict())
        self.state = copy.deepcopy(state)

    def reset(self) -> None:
        self.model.load_state_dict(self.pruned_weights)
        self.state = copy.deepcopy(self.pruned_state)

    def realign(self, heads=None, **variant) -> int:
        self.reset()
        cfg = RealignConfig(**variant)
        result = realign_model(self.model, self.adapter, self.state, cfg, self.heads if heads is None else heads,
                               dense=self.dense_stats, safety_batches=self.safety, utility_batches=self.utility)
        return result.restored
