"""The API reference (docs/api/*.rst) names every public module, and only modules that import.

CI builds it with Sphinx, warnings as errors (.ci/run); this catches a new or moved
module without running Sphinx.
"""

import importlib
import pkgutil
import re
from pathlib import Path

import divebatch_jax

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Documented through their package's page (imported members), not one by one.
THROUGH_PACKAGE = ("divebatch_jax.transform.policies.",)
NOT_API = ("divebatch_jax.train.__main__", "divebatch_jax.policies")  # an entry point; an alias


def _documented() -> set[str]:
  text = "\n".join(p.read_text() for p in DOCS.glob("**/*.rst"))
  return set(re.findall(r"^\.\. automodule:: (\S+)", text, re.M))


def _public_modules() -> set[str]:
  names = {
      info.name for info in pkgutil.walk_packages(divebatch_jax.__path__, "divebatch_jax.")
      if not any(part.startswith("_") for part in info.name.split(".")[1:])
  }
  return {n for n in names if not n.startswith(THROUGH_PACKAGE) and n not in NOT_API}


def test_every_public_module_is_in_the_api_reference():
  missing = _public_modules() - _documented()
  assert not missing, f"add these to docs/api/*.rst: {sorted(missing)}"


def test_every_documented_module_imports():
  for name in sorted(_documented()):
    importlib.import_module(name)
