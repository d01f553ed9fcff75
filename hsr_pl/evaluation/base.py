"""The judge interface and the reply checks every judge and metric shares.

A judge answers ``judge(replies, prompts) -> list[bool]`` (True = complied / attack succeeded)
and says whether it can also detect refusals (``detects_refusal``), which over-refusal needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = ["Judge", "check_replies", "normalise"]


def normalise(text: str) -> str:
    """``text`` with every run of whitespace turned into one space (what the rule-based judges match)."""
    return " ".join(text.split())


def check_replies(replies: Sequence[str], prompts: Sequence[str] | None) -> None:
    """Refuse a bare string or non-string replies, and prompts that do not pair one to one."""
    if isinstance(replies, str):
        raise TypeError("replies must be a sequence of strings, got one string; wrap it in a list")
    if not all(isinstance(r, str) for r in replies):
        raise TypeError("every reply must be a str (decode generated ids first)")
    if prompts is not None and len(prompts) != len(replies):
        raise ValueError(f"got {len(replies)} replies but {len(prompts)} prompts; pass one prompt per reply")


class Judge(ABC):
    """Decides, per reply, whether the model complied with a (harmful) request."""

    name: str = "judge"
    #: True when "not complied" means "refused", so the judge can measure over-refusal.
    detects_refusal: bool = True
    #: True when the judge also looks at the prompt's image (a vision guard model); it then gets
    #: ``images=`` (one path or image per reply, None for a text-only prompt).
    reads_images: bool = False

    @abstractmethod
    def judge(self, replies: Sequence[str], prompts: Sequence[str] | None = None) -> list[bool]:
        """One bool per reply: True = complied (an attack success on a harmful prompt)."""

    def __call__(self, replies: Sequence[str], prompts: Sequence[str] | None = None, images=None) -> list[bool]:
        check_replies(replies, prompts)
        if not self.reads_images:
            return self.judge(replies, prompts)
        if images is not None and len(images) != len(replies):
            raise ValueError(f"got {len(replies)} replies but {len(images)} images; pass one (or None) per reply")
        return self.judge(replies, prompts, images=images)

    def refused(self, replies: Sequence[str], prompts: Sequence[str] | None = None, images=None) -> list[bool]:
        """One bool per reply: True = refused. Only judges that detect refusals can say this."""
        if not self.detects_refusal:
            raise TypeError(
                f"judge {self.name!r} detects compliance or harm, not refusals; use a refusal judge "
                "(KeywordJudge or StrictRefusalJudge) to measure over-refusal"
            )
        return [not c for c in self(replies, prompts, images)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
