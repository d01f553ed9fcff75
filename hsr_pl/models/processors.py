"""Image-only processors for the families whose stock processor insists on a video processor.

In transformers 5.x the Qwen2-VL, Qwen2.5-VL, InternVL and SmolVLM processors list a
``video_processor`` among their parts. Every video processor needs torchvision, and without it
the stock processors can be neither constructed (the class check cannot even resolve
``VideoProcessorMixin``) nor reloaded (``AutoVideoProcessor`` fails). hsr-pl only ever feeds
images, so these subclasses drop the video part: their ``__init__`` signature has no
``video_processor``, which is how ``ProcessorMixin`` decides what a processor consists of. They
save and reload like any processor: ``processor_config.json`` names the subclass, and
:func:`register_image_only_processors` (run when ``hsr_pl.models`` is imported) makes
``AutoProcessor.from_pretrained`` resolve that name. The registration uses private lookup keys,
so the stock mapping of real configs to stock processors is left untouched.
"""

from __future__ import annotations

from transformers import (
    AutoProcessor,
    InternVLProcessor,
    PreTrainedConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "IMAGE_ONLY_PROCESSORS",
    "InternVLImageOnlyProcessor",
    "Qwen2VLImageOnlyProcessor",
    "Qwen2_5_VLImageOnlyProcessor",
    "SmolVLMImageOnlyProcessor",
    "register_image_only_processors",
]


# The stock __init__s pass (image_processor, tokenizer, video_processor) positionally to
# ProcessorMixin.__init__, which pairs them with get_attributes() -- read from *our* signature,
# so just (image_processor, tokenizer) -- and drops the trailing None.
class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without the (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the (torchvision-only) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """``InternVLProcessor`` without the (torchvision-only) video processor."""

    def __init__(
        self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """``SmolVLMProcessor`` without the video processor.

    The stock ``__init__`` also demands ``num2words``, which only video prompts use ("twelve
    frames ..."), so this one sets the image placeholders itself and skips that check.
    """

    def __init__(
        self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs
    ):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The generic template rendering: the stock override only adds video frame defaults."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


IMAGE_ONLY_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "internvl": InternVLImageOnlyProcessor,
    "smolvlm": SmolVLMImageOnlyProcessor,
}


_KEYS: dict[str, type[PreTrainedConfig]] = {}


def register_image_only_processors() -> None:
    """Let ``AutoProcessor.from_pretrained`` find the image-only processors by class name.

    ``AutoProcessor`` resolves a saved ``processor_class`` among its registered extras by
    ``__name__``. Each class is registered under a private config key that no checkpoint uses,
    so the stock processors stay the default for real configs. Idempotent.
    """
    for model_type, cls in IMAGE_ONLY_PROCESSORS.items():
        if model_type not in _KEYS:
            _KEYS[model_type] = type(
                f"_{cls.__name__}Key", (PreTrainedConfig,), {"model_type": f"hsr_pl_image_only_{model_type}"}
            )
        AutoProcessor.register(_KEYS[model_type], cls, exist_ok=True)
