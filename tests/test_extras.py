"""The torchao cross-check lives in its own extra: the dev install stays free of torchao's load
noise (transformers imports torchao in every process once it is installed), and CI still runs it."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_torchao_is_only_in_the_xcheck_extra_and_ci_requires_it():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [r for r in extras["dev"] if r.lower().startswith("torchao")]
    assert [r for r in extras["xcheck"] if r.lower().startswith("torchao")]
    ci = (ROOT / ".ci" / "run").read_text()
    extras_line = re.search(r'HSR_EXTRAS="\$\{HSR_EXTRAS:-([^}]*)\}"', ci)
    assert extras_line and "xcheck" in extras_line.group(1).split(",")
    assert "HSR_REQUIRE_XCHECK=1" in ci  # the cross-check tests fail in CI instead of skipping
