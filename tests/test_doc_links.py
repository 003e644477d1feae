"""The guides are self-contained: every link in the README, docs/ and the benchmark
write-ups points at a file of this repository, and docs/algorithms.md covers every rule."""

import re
from pathlib import Path

import pytest

from divebatch_jax import policies

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md")),
          *sorted((ROOT / "benchmarks" / "results").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_stays_in_the_repository(guide):
  for target in LINK.findall(guide.read_text()):
    assert not re.match(r"[a-z]+:", target), f"{guide.name}: {target} leaves the repository"
    path = (guide.parent / target.split("#")[0]).resolve()
    assert ROOT in path.parents or path == ROOT, f"{guide.name}: {target} points outside the repository"
    assert path.exists(), f"{guide.name}: {target} does not exist"
  assert "ALGORITHMS.md" not in guide.read_text(), f"{guide.name} cites the project notes outside the repository"


def test_algorithms_page_is_linked_and_names_every_rule():
  text = (ROOT / "docs" / "algorithms.md").read_text()
  assert "](docs/algorithms.md)" in (ROOT / "README.md").read_text()
  assert "](../docs/algorithms.md)" in (ROOT / "benchmarks" / "RESULTS.md").read_text()
  rules = [name for name in policies.__all__ if name[0].islower() and name != "suggest_delta"]
  missing = [name for name in rules if f"`{name}(" not in text]
  assert not missing, f"docs/algorithms.md lacks {missing}"
  for rule in ("none", "linear", "sqrt", "adascale"):
    assert f'`"{rule}"`' in text
  for field in ("count", "sum_g", "sum_sq", "sum_ip"):
    assert f"`{field}`" in text
