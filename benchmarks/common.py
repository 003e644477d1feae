"""What every benchmark's results header says about the machine and the time."""

from __future__ import annotations

import datetime
import os
import platform

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


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
