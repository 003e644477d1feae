"""CLI flags generated from :class:`~divebatch_jax.train.config.TrainConfig`'s fields.

Each field declares its flag once, with :func:`~divebatch_jax.train.config.option`:
the help text, the ``--help`` group, the accepted names and, where the default
is ``None``, what it means. This module turns them into argparse arguments:

* ``field_name`` -> ``--field-name``; the field's type gives the argument's
  (``int``, ``float``, ``str``; ``bool`` -> ``--x / --no-x``; ``tuple[int, ...]`` -> one
  or more ints);
* every help line ends with the default (``default: 0.9``);
* a flag the user does not pass is absent from the parsed namespace, so a
  ``--preset`` (or the embedded default job) provides it instead.

Adding a flag is one field in ``TrainConfig`` (:func:`~divebatch_jax.train.config.option`
declares one). The fields as flags, with a parser that leaves out what is not passed
(``argument_default=argparse.SUPPRESS``, as the CLI's does)::

    >>> import argparse
    >>> from divebatch_jax.train import flags
    >>> from divebatch_jax.train.config import TrainConfig
    >>> parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    >>> groups = flags.add_config_flags(parser)
    >>> args = parser.parse_args(["--max-batch-size", "1024", "--no-round-batch"])
    >>> vars(args)
    {'max_batch_size': 1024, 'round_batch': False}
    >>> config = flags.config_from_args(args, TrainConfig())
    >>> config.max_batch_size, config.round_batch, config.batch_size
    (1024, False, 16)
    >>> help_text = " ".join(parser.format_help().split())
    >>> "--max-batch-size INT largest batch size b_max (default: 512)" in help_text
    True

The parser needs only the config module: ``divebatch-train --help`` and a bad flag are
answered before the loop, orbax, matplotlib or tensorboardX is imported (JAX itself
still comes in with the ``divebatch_jax`` package and the accepted-name lists).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from divebatch_jax.train import config as config_lib

_METAVARS = {int: "INT", float: "X", str: "STR"}


def _scalar_type(annotation: Any) -> type:
  """``int`` for ``int | None``, ``tuple[int, ...]`` (a flag of one or more values) and so
  on; ``bool`` stays ``bool``."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if args else annotation


def default_text(field: dataclasses.Field) -> str:
  """What ``--help`` shows as the field's default."""
  if field.metadata.get("default_text"):
    return field.metadata["default_text"]
  value = field.default
  if isinstance(value, bool):
    return "on" if value else "off"
  return "none" if value is None else str(value)


def flag_fields() -> list[dataclasses.Field]:
  """The TrainConfig fields that have a CLI flag, in declaration order.

  Raises TypeError for a field declared without :func:`~divebatch_jax.train.config.option`
  (it would have no flag and no help).
  """
  fields = dataclasses.fields(config_lib.TrainConfig)
  bare = [f.name for f in fields if "help" not in f.metadata]
  if bare:
    raise TypeError(f"TrainConfig fields {bare} need config.option(default, help, group=...).")
  return list(fields)


def add_config_flags(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
  """Adds one flag per :func:`flag_fields` field, in the groups of :data:`config.GROUPS`.

  Returns the argument groups by key, so that a caller may add its own flags to one.
  """
  hints = typing.get_type_hints(config_lib.TrainConfig)
  groups = {key: parser.add_argument_group(title) for key, title in config_lib.GROUPS.items()}
  for field in flag_fields():
    kind = _scalar_type(hints[field.name])
    meta = field.metadata
    help_text = f"{meta['help']} (default: {default_text(field)})"
    name = config_lib.flag_name(field.name)
    group = groups[meta["group"]]
    if kind is bool:
      group.add_argument(name, dest=field.name, action=argparse.BooleanOptionalAction, help=help_text)
      continue
    choices = meta.get("choices")
    metavar = meta.get("metavar") or ("{" + ",".join(choices) + "}" if choices else _METAVARS[kind])
    many = {"nargs": "+"} if typing.get_origin(hints[field.name]) is tuple else {}
    group.add_argument(name, dest=field.name, type=kind, choices=choices, metavar=metavar, help=help_text, **many)
  return groups


def config_from_args(args: argparse.Namespace, base: config_lib.TrainConfig) -> config_lib.TrainConfig:
  """``base`` with every config flag the user passed (flags not passed keep ``base``'s value)."""
  names = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  return base.replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names})
