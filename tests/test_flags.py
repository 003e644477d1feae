"""CLI flags generated from TrainConfig's fields: help, defaults, groups, parsing, lazy imports."""

import dataclasses
import subprocess
import sys

import pytest

from divebatch_jax.train import cli, flags
from divebatch_jax.train import config as config_lib
from divebatch_jax.train.config import TrainConfig


def _help_text(capsys, argv=("--help",)) -> str:
  with pytest.raises(SystemExit) as exit_info:
    cli.main(list(argv))
  assert exit_info.value.code == 0
  return capsys.readouterr().out


def test_every_flag_field_has_one_flag_in_its_group_with_its_default(capsys):
  text = _help_text(capsys)
  parser = cli._train_parser()
  by_dest = {a.dest: a for a in parser._actions}
  titles = {g.title: g for g in parser._action_groups}
  for field in flags.flag_fields():
    action = by_dest[field.name]
    assert action.option_strings[0] == "--" + field.name.replace("_", "-")
    assert action.help.startswith(field.metadata["help"])
    assert action.help.endswith(f"(default: {flags.default_text(field)})")
    group = titles[config_lib.GROUPS[field.metadata["group"]]]
    assert action in group._group_actions
  for option in [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]:
    assert "(default: " in option.help, option.dest
  assert "plot RUN_DIR" in text and "(default: 0.9)" in text  # --momentum
  assert {f.name for f in flags.flag_fields()} == {f.name for f in dataclasses.fields(TrainConfig)}


def test_flags_passed_override_the_base_and_the_others_keep_it():
  args = cli._train_parser().parse_args(["--lr", "0.2", "--no-round-batch", "--model", "cnn", "--epochs", "3"])
  base = TrainConfig(epochs=7, momentum=0.5)
  config = flags.config_from_args(args, base)
  assert (config.lr, config.round_batch, config.model, config.epochs) == (0.2, False, "cnn", 3)
  assert config.momentum == 0.5 and config.seed == base.seed
  assert flags.config_from_args(cli._train_parser().parse_args([]), base) == base


def test_a_step_schedule_is_set_from_the_command_line():
  """--schedule-milestones takes one or more epochs (a tuple in the config, as a preset sets it)."""
  argv = ["--schedule", "multistep", "--schedule-milestones", "5", "10", "--schedule-gamma", "0.5"]
  config = config_lib.validate(flags.config_from_args(cli._train_parser().parse_args(argv), TrainConfig()))
  assert (config.schedule_milestones, config.schedule_gamma) == ((5, 10), 0.5)


@pytest.mark.parametrize(
    "argv,needle",
    [(["--lr", "fast"], "--lr"), (["--model", "vgg"], "--model"), (["--round-batch=3"], "--round-batch"),
     (["--schedule-milestones", "10", "5"], "--schedule-milestones"),
     (["--schedule-milestones", "0"], "--schedule-milestones"), (["--schedule-gamma", "1.5"], "--schedule-gamma")],
)
def test_a_bad_value_is_one_line_naming_the_flag(argv, needle, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and needle in err, err


def test_plot_subcommand_help_lists_its_options(capsys):
  text = _help_text(capsys, ["plot", "--help"])
  assert "run_dirs" in text and "--output" in text


def test_option_checks_its_group_and_a_field_without_it_is_refused(monkeypatch):
  with pytest.raises(ValueError, match="group must be one of"):
    config_lib.option(1, "x", group="nowhere")

  @dataclasses.dataclass(frozen=True)
  class WithABareField(TrainConfig):
    warmup_steps: int = 0

  monkeypatch.setattr(config_lib, "TrainConfig", WithABareField)
  with pytest.raises(TypeError, match=r"\['warmup_steps'\] need config.option"):
    flags.flag_fields()


@pytest.mark.parametrize(
    "dataset,model", [("digits", "mlp"), ("synthetic", "mlp"), ("cifar10", "cnn"), ("tfds:cifar100", "cnn"), ("npz:/a.npz", "mlp")]
)
def test_per_data_set_defaults_fill_only_what_is_unset(dataset, model):
  filled = config_lib.with_defaults(TrainConfig(dataset=dataset))
  assert filled.model == model
  assert filled.lr == config_lib.DEFAULT_LR.get(model, config_lib.FALLBACK_LR)
  assert config_lib.with_defaults(TrainConfig(dataset=dataset, model="logreg", lr=0.3)).model == "logreg"
  assert config_lib.validate(TrainConfig(dataset=dataset)) == filled


def test_help_parses_before_the_training_imports():
  """``--help`` imports neither the loop nor its heavy dependencies (matplotlib, orbax, tensorboardX)."""
  code = (
      "import sys\n"
      "from divebatch_jax.train import cli\n"
      "try:\n  cli.main(['--help'])\nexcept SystemExit:\n  pass\n"
      "heavy = ['divebatch_jax.train.loop', 'divebatch_jax.train.plots', 'matplotlib', 'orbax', 'tensorboardX']\n"
      "print([m for m in heavy if m in sys.modules])\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip().splitlines()[-1] == "[]"
