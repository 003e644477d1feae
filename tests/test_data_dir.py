"""Where the data lives: --data-dir, then $DIVEBATCH_DATA_DIR, then ../shared/data/tfds beside a checkout."""

from pathlib import Path

import pytest

from divebatch_jax.data import cifar10, default_data_dir, default_tfds_dir
from divebatch_jax.data import sources
from divebatch_jax.train import main


def test_the_environment_variable_comes_before_the_checkout(monkeypatch, tmp_path):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  assert default_tfds_dir() == tmp_path
  monkeypatch.delenv(sources.DATA_DIR_ENV)
  checkout = Path(sources.__file__).resolve().parents[2]
  assert (checkout / "pyproject.toml").is_file()  # the tests run from a source checkout
  assert default_tfds_dir() == default_data_dir() / "tfds" == checkout.parent / "shared" / "data" / "tfds"


def test_without_a_checkout_or_the_variable_the_error_says_what_to_pass(monkeypatch, tmp_path):
  """An installed wheel: the package lives in site-packages, with no pyproject.toml above it."""
  monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(sources, "__file__", str(tmp_path / "site-packages" / "divebatch_jax" / "data" / "sources.py"))
  assert default_tfds_dir() is None
  with pytest.raises(FileNotFoundError, match="pass --data-dir DIR") as info:
    cifar10("train")
  assert sources.DATA_DIR_ENV in str(info.value)


def test_the_cli_names_a_missing_data_directory_in_one_line(monkeypatch, tmp_path, capsys):
  missing = tmp_path / "absent"
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(missing))
  assert main(["--dataset", "cifar10", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and str(missing) in err and "--data-dir" in err, err
