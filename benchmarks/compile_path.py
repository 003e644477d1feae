"""What each run compiles, and whether a resize waits for it (results/compile_path_cpu.md).

    python benchmarks/compile_path.py default               # the default job: executables per method
    python benchmarks/compile_path.py adabatch              # AdaBatch, synthetic 20k, MLP, b0 32 -> 1024
    python benchmarks/compile_path.py adabatch --background # the same, GPU/TPU's background compile forced on

Run from a checkout (``PYTHONPATH=.``), through ``heavy`` on the shared machine.
"""

import argparse
import json
import tempfile
import threading
from pathlib import Path

from divebatch_jax.compilations import CompileCounter
from divebatch_jax.train import cli, loop
from divebatch_jax.train.config import TrainConfig, validate


def _records(out: Path) -> list[dict]:
  return [json.loads(line) for line in open(out / "metrics.jsonl")]


def default_job(scratch: Path) -> None:
  base = TrainConfig(**dict(cli.EMBEDDED_DEFAULT, out=str(scratch)))
  configs = [validate(base.replace(method=m, out=str(scratch / m), progress=False)) for m in cli.DEFAULT_COMPARISON]
  print(f"warm-up {cli._warm_up(configs[0]):.1f} s")  # pylint: disable=protected-access
  for config in configs:
    with CompileCounter() as compiles:
      loop.train_and_evaluate(config, echo=lambda line: None)
    records = _records(Path(config.out))
    print(f"{config.method}: {compiles.count} executables, {compiles.seconds:.2f} s: {dict(sorted(compiles.by_function.items()))}")
    print("  per epoch:", [r["compilations"] for r in records])


def adabatch(scratch: Path, background: bool) -> None:
  if background:  # the GPU/TPU path: one thread compiles every reachable layout while training runs
    start = loop._Compiler.__init__  # pylint: disable=protected-access

    def with_thread(self, *args):
      start(self, *args)
      self._thread = threading.Thread(target=self._everything, daemon=True)
      self._thread.start()

    loop._Compiler.__init__ = with_thread  # pylint: disable=protected-access
  config = TrainConfig(dataset="synthetic", num_examples=20000, method="adabatch", batch_size=32,
                       max_batch_size=1024, growth_every=2, epochs=12, progress=False, out=str(scratch / "run"))
  loop.train_and_evaluate(config, echo=lambda line: None)
  records = _records(scratch / "run")
  for name in ("batch_size", "train_time_s", "compile_s", "compile_stall_s", "compilations"):
    print(f"{name:16s}", [round(r[name], 3) for r in records])
  ratios = [records[i]["train_time_s"] / records[i + 1]["train_time_s"] for i in range(1, len(records) - 1)
            if records[i]["batch_size"] != records[i - 1]["batch_size"]]
  print("first epoch after a resize / the next:", [round(r, 2) for r in ratios], f"max {max(ratios):.2f}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("what", choices=("default", "adabatch"))
  parser.add_argument("--background", action="store_true")
  args = parser.parse_args()
  scratch = Path(tempfile.mkdtemp(prefix="compile-path-"))
  default_job(scratch) if args.what == "default" else adabatch(scratch, args.background)
