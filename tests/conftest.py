"""Shared test settings: measurements the CLI keeps between runs go to a temporary folder."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
  """``DIVEBATCH_CACHE_DIR`` for this session (and the subprocesses it starts), so runs in
  one session share the device-batch measurement and nothing lands in the home folder."""
  previous = os.environ.get("DIVEBATCH_CACHE_DIR")
  os.environ["DIVEBATCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("divebatch_cache"))
  yield
  if previous is None:
    os.environ.pop("DIVEBATCH_CACHE_DIR", None)
  else:
    os.environ["DIVEBATCH_CACHE_DIR"] = previous
