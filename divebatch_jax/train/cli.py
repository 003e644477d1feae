"""``divebatch-train``: the command line (a thin shell over :mod:`.loop`).

    divebatch-train                                  # embedded default: SGD vs DiveBatch vs AdaBatch
    divebatch-train --method divebatch --dataset cifar10 --model cnn --num-examples 10000
    divebatch-train --preset paper-cifar10           # the paper's CIFAR-10 settings (GPU-sized)
    divebatch-train --out runs/a --resume            # continue a killed run
    divebatch-train plot runs/a runs/b -o cmp.png    # batch size, lr, Δ̂, accuracy

With no arguments it compares three methods on scikit-learn's bundled digits
(no download; about 40 s of CPU time) and writes each run's metrics,
a results table and a plot under ``runs/default``.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import textwrap
from pathlib import Path
from typing import Sequence

import divebatch_jax
from divebatch_jax.train import config as config_lib
from divebatch_jax.train import flags, methods, safe_files, stopping

DEFAULT_COMPARISON = ("sgd", "divebatch", "adabatch")
# The embedded default: digits, an MLP, b0 = 16 growing to 512 over 30 epochs.
EMBEDDED_DEFAULT = dict(
    dataset="digits", model="mlp", epochs=30, batch_size=16, max_batch_size=512, lr=0.05,
    resize_every=5, growth_every=5, out="runs/default",
)


class _OneLineError(Exception):
  pass


class _Parser(argparse.ArgumentParser):
  """argparse that reports a bad flag as one line (no usage dump) and does not exit."""

  def error(self, message):
    raise _OneLineError(f"{self.prog}: {message}")


def _train_parser() -> _Parser:
  """The training flags: one per TrainConfig field (:mod:`.flags`), plus --preset and --compare."""
  p = _Parser(
      prog="divebatch-train",
      usage="divebatch-train [options]\n       divebatch-train plot RUN_DIR [RUN_DIR ...] [-o PNG]",
      description=textwrap.fill(
          "Adaptive batch-size training (DiveBatch and peers) with JAX. With no arguments: the "
          "embedded default job, " + ", ".join(f"{config_lib.flag_name(k)} {v}" for k, v in EMBEDDED_DEFAULT.items())
          + f", comparing {', '.join(DEFAULT_COMPARISON)} (each into OUT/<method>).", width=79, break_on_hyphens=False),
      epilog="commands:\n  plot RUN_DIR [RUN_DIR ...] [-o PNG] [--exclude-compile]\n"
      "                        plot batch size, lr, the rule's statistic and accuracy of runs "
      "(divebatch-train plot --help)",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      argument_default=argparse.SUPPRESS,
  )
  p.add_argument("--version", action="version", version=f"%(prog)s {divebatch_jax.__version__}")
  groups = flags.add_config_flags(p)
  groups["run"].add_argument("--preset", choices=sorted(config_lib.PRESETS), help="start from a named configuration (default: none)")
  groups["run"].add_argument("--compare", metavar="METHOD,METHOD", help="methods to run one after another into OUT/<method>, with a table and plot in OUT (default: none)")
  return p


def _plot_parser() -> _Parser:
  p = _Parser(prog="divebatch-train plot", description="Plot one or several runs.")
  p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
  p.add_argument("-o", "--output", default=None, help="PNG path (default: RUN_DIR/plot.png of the first run)")
  p.add_argument("--exclude-compile", action="store_true", help="the wall-time axis without compilation (compile_s) (default: off)")
  return p


def _results_table(summaries: list[dict]) -> str:
  """One row per run; a diverged run shows where it diverged and no within-1-point figures.

  Training seconds are shown with compilation and without it ("w/o compile"), so that a
  method that compiles more layouts ahead is not read as slower per step.
  """
  head = (
      f"{'method':<14}{'final acc':>10}{'best acc':>10}{'within 1pt':>11}{'steps→1pt':>11}"
      f"{'examples→1pt':>14}{'train s→1pt':>13}{'w/o compile':>12}{'train s':>9}{'w/o compile':>12}"
      f"{'compile s':>10}{'final b':>9}{'compiles':>9}"
  )
  rows = [head, "-" * len(head)]
  cell = lambda value, width, spec="": f"{'-' if value is None else format(value, spec):>{width}}"
  for s in summaries:
    percent = lambda key: cell(None, 10) if s[key] is None else cell(100 * s[key], 9, ".2f") + "%"
    diverged = s.get("diverged_at_epoch")
    within = f"div ep {diverged}" if diverged is not None else f"ep {s['first_within_epoch']}"
    rows.append(
        f"{s['method']:<14}{percent('final_accuracy')}{percent('best_accuracy')}{within:>11}"
        f"{cell(s['first_within_steps'], 11)}{cell(s['first_within_examples'], 14)}"
        f"{cell(s['first_within_train_time_s'], 13, '.1f')}"
        f"{cell(s.get('first_within_train_time_excl_compile_s'), 12, '.1f')}{s['train_time_s']:>9.1f}"
        f"{cell(s.get('train_time_excl_compile_s'), 12, '.1f')}{cell(s.get('compile_s'), 10, '.1f')}"
        f"{cell(s['final_batch_size'], 9)}{s['compilations']:>9}"
    )
  return "\n".join(rows)


def _check_before_training(configs: list[config_lib.TrainConfig]) -> list[config_lib.TrainConfig]:
  """Every check that needs no data: flags, the --out directories (a resume's stored
  flags), --devices; prints notes. Runs before the data, the model and the device batch.

  Returns the configs with their per-data-set defaults filled in (``config.validate``).
  """
  from divebatch_jax.train import parallel, resume  # pylint: disable=g-import-not-at-top

  configs = [config_lib.validate(c) for c in configs]
  for c in configs:
    for note in resume.check_out_dir(Path(c.out), c):
      print(note)
  try:
    parallel.make_mesh(configs[0].devices)
  except ValueError as err:
    raise config_lib.ConfigError(f"--devices {configs[0].devices}: {err}") from None
  return configs


def _configs(args: argparse.Namespace, embedded: bool) -> list[config_lib.TrainConfig]:
  """One config per run: the base (--preset, the embedded default or the defaults), the
  flags on top, one per --compare method; under --resume every setting the flags leave
  out comes from the run's stored config.json."""
  from divebatch_jax.train import resume  # pylint: disable=g-import-not-at-top

  if hasattr(args, "preset"):
    base = config_lib.from_preset(args.preset)
  elif embedded:
    base = config_lib.TrainConfig(**EMBEDDED_DEFAULT)
  else:
    base = config_lib.TrainConfig()
  config = flags.config_from_args(args, base)
  given = set(vars(args)) | (set(config_lib.PRESETS[args.preset]) if hasattr(args, "preset") else set())
  compared = args.compare.split(",") if hasattr(args, "compare") else None
  if embedded and compared is None:
    compared = list(DEFAULT_COMPARISON)
  if compared is None:
    configs = [config]
  else:
    for method in compared:
      if method not in methods.METHODS:
        raise config_lib.ConfigError(f"--compare: {method!r} is not a method; choose from {methods.NAMES}.")
    configs = [config.replace(method=m, out=str(Path(config.out) / m)) for m in compared]
    given.add("method")
  if config.resume:
    configs = [resume.resumed_config(c, given) for c in configs]
  return configs


def _run_training(args: argparse.Namespace, embedded: bool) -> int:
  if getattr(args, "distributed", False):
    from divebatch_jax.train import parallel  # pylint: disable=g-import-not-at-top

    parallel.initialize_distributed()
  configs = _check_before_training(_configs(args, embedded))
  from divebatch_jax.train import loop, plots  # pylint: disable=g-import-not-at-top

  if not hasattr(args, "compare") and not embedded:
    (config,) = configs
    summary = loop.train_and_evaluate(config)
    print(_results_table([summary]))
    print(f"metrics: {Path(config.out) / 'metrics.jsonl'}  summary: {Path(config.out) / 'summary.json'}")
    return _exit_status([summary])
  summaries = [loop.train_and_evaluate(c) for c in configs]
  table = _results_table(summaries)
  print("\n" + table)
  out = Path(configs[0].out).parent
  safe_files.write_atomic(out / "results.txt", table + "\n")  # never through a planted symlink
  safe_files.write_atomic(out / "results.json", json.dumps(summaries, indent=1))
  plot_path = plots.plot_runs([c.out for c in configs], out / "comparison.png", exclude_compile=True)
  print(f"\nruns, table and plot in {out}/ (results.txt, results.json, {Path(plot_path).name})")
  return _exit_status(summaries)


def _exit_status(summaries: list[dict]) -> int:
  """1 when a run diverged (its line was printed as it stopped), else 0."""
  diverged = [s for s in summaries if s.get("diverged_at_epoch") is not None]
  for s in diverged:
    print(f"error: {s['method']} diverged at epoch {s['diverged_at_epoch']} (summary: {s['out']})", file=sys.stderr)
  return 1 if diverged else 0


# What a user's mistake raises: the CLI's own checks (ConfigError: bad flags and values,
# and the library's checks of data files, models, checkpoints that the loop wraps with
# config.user_errors), missing or clashing paths, a read-only --out, another run holding
# --out. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    _OneLineError, config_lib.ConfigError, FileNotFoundError, FileExistsError, PermissionError,
    NotADirectoryError, IsADirectoryError,
)
# OSErrors that are the machine's state, not a bug: a full disk or quota, a name too long.
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _os_error_line(err: OSError) -> str | None:
  """One line for a full disk or a too-long name (None for any other OSError)."""
  where = f" ({err.filename})" if err.filename else ""
  if err.errno in DISK_ERRNOS:
    return (f"error: {DISK_ERRNOS[err.errno]}{where}: nothing already committed is lost (the "
            "epochs in metrics.jsonl, the committed checkpoints, config.json); free space, then "
            "continue with --resume.")
  if err.errno == errno.ENAMETOOLONG:
    return f"error: file name too long{where}: use a shorter path."
  return None


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI on ``argv`` (without the program name); returns the exit status.

  A user error (:data:`USER_ERRORS`, a full disk, a name too long) prints one line
  ``error: ...`` on stderr and returns 2, without a traceback; a run stopped by SIGTERM
  or SIGINT prints where it stopped and returns 128 + signal.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    if argv and argv[0] == "plot":
      from divebatch_jax.train import plots  # pylint: disable=g-import-not-at-top

      args = _plot_parser().parse_args(argv[1:])
      output = args.output or str(Path(args.run_dirs[0]) / "plot.png")
      with config_lib.user_errors("plot"):
        print(plots.plot_runs(args.run_dirs, output, exclude_compile=args.exclude_compile))
      return 0
    args = _train_parser().parse_args(argv)
    return _run_training(args, embedded=not argv)
  except USER_ERRORS as err:
    print("error: " + " ".join(line.strip() for line in str(err).splitlines()), file=sys.stderr)
    return 2
  except OSError as err:
    line = _os_error_line(err)
    if line is None:
      raise
    print(line, file=sys.stderr)
    return 2
  except stopping.Interrupted as stopped:  # SIGTERM / SIGINT: checkpointed, exit as killed by it
    print(stopped, file=sys.stderr)
    return stopped.exit_status
  except KeyboardInterrupt:  # a second SIGINT (or one before training): stopped at once
    print(stopping.AT_ONCE, file=sys.stderr)
    return 128 + signal.SIGINT


def console_main() -> None:
  sys.exit(main())
