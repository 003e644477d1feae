"""``divebatch-train``: the command line (a thin shell over :mod:`.loop`).

    divebatch-train                                  # embedded default: SGD vs DiveBatch vs AdaBatch
    divebatch-train --method divebatch --dataset cifar10 --model cnn --num-examples 10000
    divebatch-train --preset paper-cifar10           # the paper's CIFAR-10 settings (GPU-sized)
    divebatch-train --out runs/a --resume            # continue a killed run
    divebatch-train plot runs/a runs/b -o cmp.png    # batch size, lr, Δ̂, accuracy
    divebatch-train cbs --out runs/a                 # critical batch size at runs/a's checkpoints

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
    resize_every=3, growth_every=3, out="runs/default",
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
      "(divebatch-train plot --help)\n"
      "  cbs --out RUN_DIR [--multiples 1,2,4,8] [--budget-examples N] [--epsilon 0.01]\n"
      "                        measure the critical batch size at a run's checkpoints",
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


def _cbs_parser() -> _Parser:
  from divebatch_jax.train import cbs  # pylint: disable=g-import-not-at-top

  p = _Parser(prog="divebatch-train cbs", description="Measure the critical batch size at a finished run's "
              "checkpoints (Merrill et al. 2025): writes OUT/cbs.json, cbs.md and cbs.png.")
  p.add_argument("--out", required=True, help="the finished run's directory (config.json, metrics.jsonl, checkpoints/)")
  p.add_argument("--multiples", default=",".join(map(str, cbs.MULTIPLES)),
                 help="branch batches k·b0, as k,k,... (default: %(default)s)")
  p.add_argument("--budget-examples", type=int, default=None,
                 help="examples per branch (default: 8 steps of the largest batch)")
  p.add_argument("--epsilon", type=float, default=cbs.EPSILON,
                 help="tolerance: loss(B) <= (1 + ε)·loss(b0) (default: %(default)s)")
  return p


def _run_cbs(argv: list[str]) -> int:
  from divebatch_jax.train import cbs  # pylint: disable=g-import-not-at-top

  args = _cbs_parser().parse_args(argv)
  try:
    multiples = [int(k) for k in args.multiples.split(",")]
  except ValueError:
    raise config_lib.ConfigError(f"cbs --multiples must be integers k,k,..., got {args.multiples!r}.") from None
  with config_lib.user_errors("cbs"):
    cbs.measure(args.out, multiples=multiples, budget_examples=args.budget_examples, epsilon=args.epsilon)
  print(f"critical batch size: {Path(args.out) / cbs.CBS_MD} (table), {cbs.CBS_JSON}, {cbs.CBS_PNG}")
  return 0


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
    parallel.run_mesh(configs[0].mesh, configs[0].devices)
  except ValueError as err:
    flag = f"--devices {configs[0].devices}" if configs[0].mesh is None else f"--mesh {configs[0].mesh}"
    raise config_lib.ConfigError(f"{flag}: {err}") from None
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


# Flags that keep the default job (they change where it writes or what it shows, not what
# it trains); any other flag trains one run of --method (divebatch unless given).
KEEPS_DEFAULT_JOB = frozenset({"out", "resume", "progress", "tensorboard", "compilation_cache", "data_dir"})
COMPARISON_FILES = ("results.txt", "results.json", "comparison.png")


def _is_default_job(args: argparse.Namespace) -> bool:
  """No flag but those of :data:`KEEPS_DEFAULT_JOB`, and ``--out`` holding no single run
  (``--out D --resume`` continues the single run in D)."""
  if not set(vars(args)) <= KEEPS_DEFAULT_JOB:
    return False
  out = Path(getattr(args, "out", EMBEDDED_DEFAULT["out"]))
  return not (out / "config.json").is_file()


def _default_job_done(out: Path) -> bool:
  return (out / "results.json").is_file()


def _single_run_note(args: argparse.Namespace) -> str | None:
  """The one line saying that flags turned the default comparison into one run."""
  if hasattr(args, "method") or hasattr(args, "preset") or hasattr(args, "compare"):
    return None
  given = " ".join(config_lib.flag_name(k) for k in sorted(set(vars(args)) - KEEPS_DEFAULT_JOB))
  return (f"note: with {given} (and no --method) divebatch-train trains one divebatch run, not the default "
          "comparison (--method M chooses the method, --compare M,M compares methods on these flags).")


def _run_training(args: argparse.Namespace, embedded: bool) -> int:
  if getattr(args, "distributed", False):
    from divebatch_jax.train import parallel  # pylint: disable=g-import-not-at-top

    parallel.initialize_distributed()
  if embedded:
    out = Path(getattr(args, "out", EMBEDDED_DEFAULT["out"]))
    if _default_job_done(out) and not getattr(args, "resume", False):
      print(f"the default job is done: its results are in {out}/ ({', '.join(COMPARISON_FILES)}); "
            f"divebatch-train --out DIR runs it again into a fresh folder DIR.")
      return 0
  elif (note := _single_run_note(args)) is not None:
    print(note)
  configs = _check_before_training(_configs(args, embedded))
  from divebatch_jax.train import loop  # pylint: disable=g-import-not-at-top

  if not hasattr(args, "compare") and not embedded:
    (config,) = configs
    summary = loop.train_and_evaluate(config)
    print(_results_table([summary]))
    print(f"metrics: {Path(config.out) / 'metrics.jsonl'}  summary: {Path(config.out) / 'summary.json'}")
    return _exit_status([summary])
  if embedded:
    print(f"default job: {', '.join(DEFAULT_COMPARISON)} on {configs[0].dataset}, one after another into "
          f"{Path(configs[0].out).parent}/<method> (one run instead: divebatch-train --method M ...)")
  return _run_comparison(configs)


def _run_comparison(configs: list[config_lib.TrainConfig]) -> int:
  """Runs each config (after a warm-up charged to none of them), then the table, the
  verdicts, results.txt / results.json and the plot in the parent of their --out."""
  from divebatch_jax.train import comparison, loop, metrics, plots  # pylint: disable=g-import-not-at-top

  seconds = _warm_up(configs[0])
  if seconds is not None:
    print(f"warm-up: {seconds:.1f} s (JAX's one-time start-up, one silent epoch; charged to no method)")
  summaries = [loop.train_and_evaluate(c) for c in configs]
  runs = {s["method"]: metrics.read_records(Path(c.out) / metrics.METRICS_FILE) for s, c in zip(summaries, configs)}
  rows = comparison.compare(runs, {s["method"]: s for s in summaries})
  table = comparison.table(rows)
  print("\n" + table)
  out = Path(configs[0].out).parent
  safe_files.write_atomic(out / "results.txt", table + "\n")  # never through a planted symlink
  safe_files.write_atomic(out / "results.json", json.dumps(rows, indent=1))
  plot_path = plots.plot_runs([c.out for c in configs], out / "comparison.png", exclude_compile=True)
  print(f"\nruns, table and plot in {out}/ (results.txt, results.json, {Path(plot_path).name})")
  return _exit_status(summaries)


def _warm_up(config: config_lib.TrainConfig) -> float | None:
  """One silent epoch of plain SGD in a scratch folder before the timed runs, so that JAX's
  one-time start-up (its first traces and compilations of shared pieces) lands in no
  method's time; None when the runs resume (their epochs were timed before)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  from divebatch_jax.train import loop  # pylint: disable=g-import-not-at-top

  if config.resume:
    return None
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="divebatch-warm-up-") as scratch:
    scratch_config = config.replace(method="sgd", epochs=1, out=scratch, compilation_cache="off", tensorboard=None,
                                    progress=False, checkpoint_every=10**6)
    loop.train_and_evaluate(scratch_config, echo=lambda line: None)
  return time.perf_counter() - start


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
    if argv and argv[0] == "cbs":
      return _run_cbs(argv[1:])
    args = _train_parser().parse_args(argv)
    return _run_training(args, embedded=_is_default_job(args))
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
