"""VLGuard's evaluation subsets (Zong et al., ICML 2024) in terms of the splits hsr-pl reads.

VLGuard's ``test.json`` has the layout of ``train.json`` (records with ``image``, ``safe``,
``harmful_category``, ``harmful_subcategory`` and ``instr-resp``; release ys-zong/VLGuard, commit
807fe4c), and VLGuard's evaluation script reads three subsets from it:

- ``unsafes``: unsafe images with their ``instruction`` — ASR (a refusal is expected);
- ``safe_unsafes``: safe images with the ``unsafe_instruction`` — ASR (the harm is in the text);
- ``safe_safes``: safe images with the ``safe_instruction`` — helpfulness, which VLGuard scores
  with a GPT-4 comparison against reference answers; hsr-pl reports the over-refusal rate here.

So ``split: unsafes`` is the ``safety`` split, ``safe_unsafes`` is ``over_refusal`` and
``safe_safes`` is ``utility`` restricted to safe images.
"""

from __future__ import annotations

__all__ = ["SUBSET_KINDS", "SUBSETS", "select_subset"]

SUBSETS = {"unsafes": "safety", "safe_unsafes": "over_refusal", "safe_safes": "utility"}
SUBSET_KINDS = {"unsafes": "harmful", "safe_unsafes": "harmful", "safe_safes": "benign"}


def select_subset(examples: list[dict], subset: str) -> list[dict]:
    """The examples of one VLGuard evaluation subset (flat examples from ``load_vlguard``)."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown VLGuard subset {subset!r}; choose from {sorted(SUBSETS)}")
    split = SUBSETS[subset]
    return [e for e in examples if e["split"] == split and (subset != "safe_safes" or e["safe"])]
