"""The method registry: one entry per --method, and every part of the shell reads it."""

import pytest

from conftest import write_cbs_file
from divebatch_jax.train import cli, config as config_lib, methods

RATES = {16: 1000.0, 32: 1800.0, 64: 2000.0}


def _choices(parser, flag):
  (action,) = [a for a in parser._actions if flag in a.option_strings]
  return tuple(action.choices)


def test_cli_choices_and_validation_come_from_the_registry():
  assert _choices(cli._train_parser(), "--method") == methods.NAMES
  for name in methods.NAMES:
    config_lib.validate(config_lib.TrainConfig(method=name))
  with pytest.raises(config_lib.ConfigError, match=r"--method must be one of \('sgd'"):
    config_lib.validate(config_lib.TrainConfig(method="lars"))
  with pytest.raises(ValueError, match="--method must be one of"):
    methods.method("lars")


@pytest.mark.parametrize("name", methods.NAMES)
def test_each_entry_builds_its_policy_and_says_whether_it_needs_statistics(name, tmp_path):
  entry = methods.METHODS[name]
  curve = dict(cbs_file=str(write_cbs_file(tmp_path / "cbs.json", [0, 100], [8, 64]))) if name == "cbs-warmup" else {}
  config = config_lib.validate(config_lib.TrainConfig(method=name, epochs=12, schedule="cosine", **curve))
  policy = methods.build_policy(config, RATES)
  # the entry's claim matches the policy's own measurement window
  assert any(policy.needs_stats(e) for e in range(12)) == entry.needs_stats
  assert (policy.max_batch_size is None) == (name == "sgd")


def test_rates_are_asked_for_only_by_the_method_that_needs_them():
  assert [m.name for m in methods.METHODS.values() if m.needs_rates] == ["goodput"]
  with pytest.raises(ValueError, match="goodput needs measured throughputs"):
    methods.build_policy(config_lib.TrainConfig(method="goodput"))
  assert [m.name for m in methods.METHODS.values() if m.statistic == methods.DIVERSITY] == ["divebatch"]



def test_cbs_warmup_without_its_curve_is_one_clear_line(tmp_path):
  with pytest.raises(ValueError, match="--method cbs-warmup needs --cbs-file FILE"):
    methods.build_policy(config_lib.TrainConfig(method="cbs-warmup"))
  with pytest.raises(FileNotFoundError, match="--cbs-file"):
    methods.build_policy(config_lib.TrainConfig(method="cbs-warmup", cbs_file=str(tmp_path / "absent.json")))
