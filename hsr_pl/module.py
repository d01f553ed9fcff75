"""``LVLMModule``: a LightningModule around a Hugging Face vision-language (or causal) model.

- loads a local checkpoint in ``configure_model`` (so sharded strategies can wrap it), or wraps an
  ``nn.Module`` passed in; ``tiny:<family>[-gqa]`` builds a tiny random model for tests and demos;
- ``training_step``: supervised fine-tuning loss on answer tokens only (the collator labels the
  prompt -100);
- ``validation_step``: greedy generation on each evaluation set and the safety / utility metrics;
- :meth:`generate`: batched greedy decoding with left padding, used by evaluation and the demo.

Everything that can be checked cheaply (path exists, is a model folder, has a processor, is a
supported architecture) is checked in ``__init__``, before any weights are read.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from .distributed import (
    ShardingError,
    checkpoint_name_mapper,
    count_non_finite,
    load_sharded,
    meta_parameters,
    model_is_sharded,
    shard_model,
)
from .evaluation import build_eval_metrics, check_judge, make_judge
from .models import get_adapter
from .models.checkpoints import ModelLoadError, check_model_folder, check_safetensors
from .models.organism import (
    ORGANISM_PACKAGE_PATH,
    ORGANISM_V2_PACKAGE_PATH,
    build_organism,
    build_organism_qwen2vl,
)
from .models.tiny import TINY_BUILDERS, build_tiny
from .report.evaluation import print_eval_breakdowns, print_eval_table, write_eval_json

__all__ = ["LVLMModule", "ModelLoadError", "check_finite_parameters", "check_safetensors"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_TEXT_ONLY = {"llama", "mistral", "qwen2"}


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, floor: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps, then constant or a half cosine that reaches ``floor``
    at step ``total - 1``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - 1 - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_finite_parameters(
    model: nn.Module, source: str, fix: str = "the checkpoint is damaged: re-export or re-download it"
) -> None:
    """Refuse weights holding NaN/inf, naming the first such parameter (every later step would
    otherwise fail with a misleading message, or prune and score garbage silently)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            bad = count_non_finite(param)
            if bad:
                raise ModelLoadError(f"{source}: weight {name} holds {bad} NaN/inf value(s); {fix}")


class LVLMModule(pl.LightningModule):
    """Wraps an HF image-text-to-text model (or a text-only causal LM) for fit and validate.

    Args:
        model: a local checkpoint folder, ``"tiny:<family>"`` / ``"tiny:<family>-gqa"`` (random
            tiny model from config), ``"organism"`` (the shipped aligned tiny LVLM),
            ``"organism:init"`` / ``"organism:init-gqa"`` (the organism's architecture, random
            init from ``init_seed``: what ``configs/organism.yaml`` trains), ``"organism-v2"`` (the
            shipped v2 organism), ``"organism-v2:init"`` (v2's 6-layer GQA LLaVA, random init:
            ``configs/organism_v2.yaml``), ``"organism-v2-qwen2vl:init"`` (v2 as a Qwen2-VL:
            ``configs/organism_v2_qwen2vl.yaml``), or an ``nn.Module``.
            (Annotated ``str | Any``: for a parameter that accepts a class, jsonargparse reads a
            path to an existing file as that file's content.)
        processor: a processor object or folder; default: the model folder.
        dtype: weights dtype when loading (``float32``, ``bfloat16``, ``float16``).
        attn_implementation: passed to ``from_pretrained`` (``eager`` keeps head hooks exact).
        trust_remote_code: off unless you turn it on.
        learning_rate / weight_decay / betas / warmup_steps / lr_schedule / min_lr_ratio: the
            default AdamW with linear warm-up, then ``constant`` or ``cosine`` decay to
            ``min_lr_ratio × learning_rate`` at the last step; override with LightningCLI's
            ``optimizer:`` / ``lr_scheduler:`` keys.
        max_new_tokens: generation budget for evaluation (greedy).
        judges: the judges for ASR and over-refusal, by name or as a mapping (see
            :func:`hsr_pl.evaluation.judges.make_judge`; default ``["keyword-gcg"]``); every reported rate
            carries its judge's name, and with two or more judges each harmful set also reports
            their pairwise agreement (Cohen's κ).
        refusal: the aligned refusal sentence, for the ``strict`` judge.
        eval_output: a JSON file to write every evaluation result to (rates per judge, per
            category, judge agreement, utility scores); None writes none.
    """

    def __init__(
        self,
        model: str | Any = "tiny:llava",
        processor: Any = None,
        dtype: str = "float32",
        attn_implementation: str | None = "eager",
        trust_remote_code: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        init_seed: int = 0,
        max_new_tokens: int = 32,
        judges: list[str | dict[str, Any]] | None = None,
        refusal: str | None = None,
        eval_output: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, (str, nn.Module)):
            raise ModelLoadError(
                f"model={model!r} is a {type(model).__name__}; pass a checkpoint folder, 'tiny:<family>', 'organism' "
                "or an nn.Module"
            )
        if dtype not in _DTYPES:
            raise ModelLoadError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        if max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={lr_schedule!r}: use 'constant' or 'cosine'")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio} must lie in [0, 1]")
        for judge in judges or []:
            check_judge(judge)  # a misspelt judge fails now, not after the run's work
        self.save_hyperparameters(ignore=["model", "processor"])
        self.model_source = model if isinstance(model, str) else None
        self.model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self._model_type: str | None = None
        self._tiny_processor = None
        if isinstance(model, str):
            self._model_type = self._prepare_source(model, trust_remote_code)
        if isinstance(processor, str):
            processor = self._load_processor(Path(processor).expanduser(), None, "processor")
        self.processor = processor if processor is not None else self._default_processor()
        self.eval_metrics: nn.ModuleDict | None = None
        self._judges: list | None = None  # built once, shared by every evaluation set

    # ------------------------------------------------------------------------------ loading
    def _prepare_source(self, source: str, trust_remote_code: bool) -> str:
        if source.startswith("tiny:"):
            family = source.removeprefix("tiny:")
            gqa = family.endswith("-gqa")
            family = family.removesuffix("-gqa")
            if family not in TINY_BUILDERS:
                raise ModelLoadError(f"{source!r}: no tiny builder; known: {sorted(TINY_BUILDERS)}")
            # Tiny models are cheap: build now so the processor is known to the data module.
            self.model, self._tiny_processor = build_tiny(family, gqa=gqa)
            return self.model.config.model_type
        if source in ("organism:init", "organism:init-gqa"):
            self.model, self._tiny_processor = build_organism(
                seed=self.hparams.init_seed, gqa=source.endswith("-gqa")
            )
            return self.model.config.model_type
        if source == "organism-v2:init":
            self.model, self._tiny_processor = build_organism(seed=self.hparams.init_seed, version=2)
            return self.model.config.model_type
        if source == "organism-v2-qwen2vl:init":
            self.model, self._tiny_processor = build_organism_qwen2vl(seed=self.hparams.init_seed)
            return self.model.config.model_type
        if source in ("organism", "organism-v2"):
            shipped = ORGANISM_PACKAGE_PATH if source == "organism" else ORGANISM_V2_PACKAGE_PATH
            self.model_source = str(shipped)
            return check_model_folder(Path(shipped), trust_remote_code)
        return check_model_folder(Path(source).expanduser(), trust_remote_code)

    def _default_processor(self):
        if self._tiny_processor is not None:
            return self._tiny_processor
        if self.model_source is None:
            return None
        return self._load_processor(Path(self.model_source).expanduser(), self._model_type, "model")

    def _load_processor(self, path: Path, model_type: str | None, label: str):
        """The processor (a tokenizer for text-only models) of ``path``; errors name the folder."""
        from transformers import AutoProcessor, AutoTokenizer

        if not path.is_dir():
            raise ModelLoadError(f"{label}={str(path)!r} is not a folder; pass the folder that holds the processor files")
        loader = AutoTokenizer if model_type in _TEXT_ONLY else AutoProcessor
        try:
            return loader.from_pretrained(path, trust_remote_code=self.hparams.trust_remote_code)
        except Exception as exc:  # transformers raises many kinds here; all mean "this folder is unusable"
            raise ModelLoadError(
                f"cannot load the processor from {path} ({_first_line(exc)}); save it next to the weights "
                "(processor.save_pretrained(path)) or pass processor=<folder>"
            ) from exc

    def configure_model(self) -> None:
        """Load the weights (once). Called by Lightning inside the strategy's init context.

        Under ``ModelParallelStrategy`` (a device mesh is set) the model is sharded with FSDP2
        instead: a checkpoint folder is built on the meta device, every decoder layer (and the
        rest) is ``fully_shard``-ed over the data-parallel mesh and each rank reads only its own
        rows of each tensor (docs/sharded.md); a model that already exists (tiny, organism init,
        an ``nn.Module``) is sharded in place.
        """
        mesh = self.device_mesh
        if mesh is not None:
            self._configure_sharded(mesh)
            return
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        loader = AutoModelForCausalLM if self._model_type in _TEXT_ONLY else AutoModelForImageTextToText
        kwargs = dict(dtype=_DTYPES[self.hparams.dtype], trust_remote_code=self.hparams.trust_remote_code)
        if self.hparams.attn_implementation:
            kwargs["attn_implementation"] = self.hparams.attn_implementation
        rank_zero_info(f"hsr-pl: loading {self.model_source} ({self.hparams.dtype})")
        try:
            # safetensors only: a pickle file in the folder is never unpickled.
            model, info = loader.from_pretrained(
                Path(self.model_source).expanduser(), use_safetensors=True, output_loading_info=True, **kwargs
            )
        except Exception as exc:  # transformers/safetensors raise many kinds; all mean "cannot load this"
            raise ModelLoadError(
                f"cannot load the weights of {self.model_source} ({_first_line(exc)}); check the checkpoint "
                "(re-save it with save_pretrained) or its dtype/attn_implementation settings"
            ) from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            # transformers would initialise these randomly and carry on: a silently different model.
            raise ModelLoadError(
                f"{self.model_source}: the weights lack {len(missing)} tensor(s) of its config.json (e.g. {missing[0]!r}); "
                "the files do not match the architecture: re-save the checkpoint with save_pretrained"
            )
        get_adapter(model)  # fail now, not deep inside a callback
        check_finite_parameters(model, str(self.model_source))
        self.model = model

    def _data_parallel_mesh(self, mesh):
        names = tuple(mesh.mesh_dim_names or ())
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
            raise ShardingError(
                f"ModelParallelStrategy(tensor_parallel_size={mesh['tensor_parallel'].size()}): hsr-pl shards with FSDP2 "
                "only; set tensor_parallel_size=1 and data_parallel_size to the number of GPUs"
            )
        return mesh["data_parallel"] if "data_parallel" in names else mesh

    def _configure_sharded(self, mesh) -> None:
        if self.model is not None and model_is_sharded(self.model):
            return  # configure_model runs again on a second validate/fit: already sharded
        dp_mesh = self._data_parallel_mesh(mesh)
        if self.model is not None:
            shard_model(self.model, dp_mesh)
            return
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        loader = AutoModelForCausalLM if self._model_type in _TEXT_ONLY else AutoModelForImageTextToText
        source = Path(self.model_source).expanduser()
        kwargs = dict(dtype=_DTYPES[self.hparams.dtype], trust_remote_code=self.hparams.trust_remote_code)
        if self.hparams.attn_implementation:
            kwargs["attn_implementation"] = self.hparams.attn_implementation
        rank_zero_info(f"hsr-pl: building {self.model_source} on the meta device, sharded over {dp_mesh.size()} ranks")
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=self.hparams.trust_remote_code)
            with meta_parameters():
                model = loader.from_config(config, **kwargs)
        except Exception as exc:  # transformers raises many kinds; all mean "cannot build this"
            raise ModelLoadError(
                f"cannot build {self.model_source} from its config.json ({_first_line(exc)}); check the checkpoint's "
                "config or its dtype/attn_implementation settings"
            ) from exc
        model.eval()
        get_adapter(model)
        names = checkpoint_name_mapper(model)  # before fully_shard renames the classes
        shard_model(model, dp_mesh)
        self.load_report = load_sharded(model, source, names=names)
        check_finite_parameters(model, str(self.model_source))
        self.model = model

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    # ----------------------------------------------------------------------------- training
    def forward(self, **batch):
        return self.model(**batch)

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        """The tensors of a collated batch (drops references, names and other metadata)."""
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def on_fit_start(self) -> None:
        # from_pretrained returns a model in eval mode; fine-tuning wants dropout etc. active.
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "labels" not in batch:
            raise ValueError("training batches need labels (collate with with_response=True)")
        loss = self.model(**self.model_inputs(batch)).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.learning_rate,
            betas=tuple(self.hparams.betas),
        )
        if self.hparams.warmup_steps <= 0 and self.hparams.lr_schedule == "constant":
            return optimizer
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
        factor = partial(
            lr_factor,
            warmup=self.hparams.warmup_steps,
            total=total,
            schedule=self.hparams.lr_schedule,
            floor=self.hparams.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int | None = None) -> list[str]:
        """Greedy replies for a left-padded prompt batch, decoded without special tokens."""
        inputs = self.model_inputs(batch)
        inputs.pop("labels", None)
        width = inputs["input_ids"].shape[1]
        tokenizer = self.tokenizer
        sharded = {"synced_gpus": True} if model_is_sharded(self.model) else {}
        output = self.model.generate(
            **inputs,
            **sharded,
            max_new_tokens=max_new_tokens or self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return [text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]

    # --------------------------------------------------------------------------- validation
    def metrics_for(self, batch: dict, store: dict | nn.ModuleDict):
        """The metric group of ``batch``'s evaluation set in ``store``, built on first use.

        ``validate`` keeps its groups in ``self.eval_metrics``; :func:`hsr_pl.evaluation.runner.evaluate`
        passes its own store, so stage-by-stage evaluations never mix with the loop's counts.
        """
        if self._judges is None:  # a guard model is loaded once, not once per evaluation set
            self._judges = [make_judge(j, refusal=self.hparams.refusal) for j in self.hparams.judges or ["keyword-gcg"]]
        eval_set, meta = batch["eval_set"], batch.get("eval_meta") or {}
        if eval_set not in store:
            store[eval_set] = build_eval_metrics(
                batch["kind"], judges=self._judges, scoring=meta.get("scoring", "match"),
                categories=meta.get("categories", ()), num_groups=meta.get("num_groups", 0),
                circular=meta.get("circular", False),
            ).to(self.device)
        return store[eval_set]

    def eval_step(self, batch: dict, store: dict | nn.ModuleDict) -> list[str]:
        """Greedy replies for one evaluation batch, added to its set's metrics in ``store``."""
        replies = self.generate(batch, (batch.get("eval_meta") or {}).get("max_new_tokens"))
        self.metrics_for(batch, store).update_batch(replies, batch)
        return replies

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.eval_metrics is None:
            self.eval_metrics = nn.ModuleDict()
        self.eval_step(batch, self.eval_metrics)

    def on_validation_epoch_end(self) -> None:
        if self.eval_metrics is None:
            return
        rows, summaries = [], []
        for eval_set, metrics in self.eval_metrics.items():
            values = metrics.compute()
            for name, value in values.items():
                # "asr[keyword-gcg]" -> "val/<set>/asr/keyword-gcg" (brackets are rich markup).
                key = name.replace("[", "/").replace("]", "")
                self.log(f"val/{eval_set}/{key}", value, add_dataloader_idx=False, sync_dist=False)
            rows.append((eval_set, metrics.kind, values, int(metrics.count())))
            summaries.append(metrics.summary(eval_set))
            metrics.reset()
        if self.trainer.is_global_zero:
            print_eval_table(rows)
            print_eval_breakdowns(summaries)
            if self.hparams.eval_output:
                write_eval_json(self.hparams.eval_output, summaries, model=self.model_source or type(self.model).__name__,
                                judges=[j.name for j in self._judges or []])
