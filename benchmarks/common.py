"""What every benchmark's results header says about the machine and the time."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

import jax


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def machine() -> str:
  """The device, host CPU, core count and versions, for a results header."""
  device = jax.devices()[0]
  return (
      f"{device.platform.upper()} {device.device_kind}; host {cpu_model()}, {os.cpu_count()} logical cores; "
      f"jax {jax.__version__}, Python {platform.python_version()}"
  )


def rerun_command(script: str, argv: list[str] | None) -> str:
  """The command that reran a benchmark, for its results header: ``script`` (its path from
  the repository root, used when ``main`` was called with ``argv``) or the command line."""
  words = [script, *argv] if argv is not None else [os.path.relpath(sys.argv[0]), *sys.argv[1:]]
  return "PYTHONPATH=. python " + shlex.join(words)


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
