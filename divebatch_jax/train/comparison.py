"""A comparison's verdict: every run against a common target, and one line per method.

``divebatch-train`` (the default job) and ``--compare`` run several methods on the
same data. Each method's own "within 1 point of its final accuracy" says nothing
about the others; here every run is measured against one **common target**: the
reference run's final accuracy (small-batch SGD, ``sgd``, when it is compared;
else the first run) less :data:`TARGET_MARGIN` (half a point). Per run:

* final accuracy, total optimizer steps and examples (``total_steps``,
  ``total_examples``);
* ``steps_to_target`` / ``examples_to_target`` / ``epoch_to_target``: through the
  first epoch whose test accuracy is at least the target (None: never reached);
* ``train_time_excl_compile_to_target_s`` and ``train_time_excl_compile_s``:
  training seconds without compilation (``compile_s``), so the one-time compile
  of each layout is charged to no method;
* ``verdict``: one line, e.g. ``divebatch: 98.61% vs sgd 98.33%, 2.6x fewer
  optimizer steps (1,025 vs 2,700); to the 97.83% target 496 vs 1,080 steps (2.2x
  fewer)``.

Example (two runs of three epochs; SGD's final 0.90, so the target is 0.895)::

    >>> def records(accuracies, steps):
    ...   return [{"epoch": e + 1, "test_accuracy": a, "steps": s, "examples": 100,
    ...            "train_time_s": 1.0, "compile_s": 0.25}
    ...           for e, (a, s) in enumerate(zip(accuracies, steps))]
    >>> runs = {"sgd": records([0.5, 0.89, 0.90], [10, 10, 10]),
    ...         "divebatch": records([0.5, 0.91, 0.92], [10, 5, 2])}
    >>> rows = compare(runs)
    >>> rows[1]["target_accuracy"], rows[1]["steps_to_target"], rows[0]["steps_to_target"]
    (0.895, 15, 30)
    >>> print(rows[1]["verdict"])
    divebatch: 92.00% vs sgd 90.00%, 1.8x fewer optimizer steps (17 vs 30); to the 89.50% target 15 vs 30 steps (2.0x fewer)
"""

from __future__ import annotations

from typing import Mapping, Sequence

TARGET_MARGIN = 0.005  # the common target: the reference's final accuracy less half a point
REFERENCE = "sgd"
_ROUNDING = 1e-9


def reference_of(names: Sequence[str]) -> str:
  """The run the others are measured against: ``sgd`` when compared, else the first."""
  return REFERENCE if REFERENCE in names else names[0]


def to_target(records: Sequence[dict], target: float) -> dict | None:
  """Epoch, optimizer steps, examples and training seconds without compilation through
  the first epoch whose test accuracy is at least ``target`` (None: never)."""
  steps = examples = seconds = 0
  for r in records:
    steps, examples = steps + r["steps"], examples + r["examples"]
    seconds += r["train_time_s"] - (r.get("compile_s") or 0.0)
    if r["test_accuracy"] >= target - _ROUNDING:
      return {"epoch": r["epoch"], "steps": steps, "examples": examples, "seconds": seconds}
  return None


def _ratio(reference: float, value: float) -> str:
  if value <= 0 or reference <= 0:
    return "n/a"
  if value <= reference:
    return f"{reference / value:.1f}x fewer"
  return f"{value / reference:.1f}x more"


def _verdict(row: dict, ref: dict) -> str:
  name, final = row["method"], row["final_accuracy"]
  if final is None:
    return f"{name}: diverged (no final accuracy)"
  if row is ref:
    reached = (f"; reaches the {100 * row['target_accuracy']:.2f}% target at {row['steps_to_target']:,} steps"
               if row["steps_to_target"] is not None else "")
    return f"{name}: {100 * final:.2f}% in {row['total_steps']:,} optimizer steps (the reference){reached}"
  line = (f"{name}: {100 * final:.2f}% vs {ref['method']} {100 * ref['final_accuracy']:.2f}%, "
          f"{_ratio(ref['total_steps'], row['total_steps'])} optimizer steps "
          f"({row['total_steps']:,} vs {ref['total_steps']:,})")
  target = f"{100 * row['target_accuracy']:.2f}% target"
  if row["steps_to_target"] is None:
    return line + f"; never reached the {target}"
  if ref["steps_to_target"] is None:
    return line + f"; to the {target} {row['steps_to_target']:,} steps ({ref['method']} never reached it)"
  return (line + f"; to the {target} {row['steps_to_target']:,} vs {ref['steps_to_target']:,} steps "
          f"({_ratio(ref['steps_to_target'], row['steps_to_target'])})")


def compare(runs: Mapping[str, Sequence[dict]], summaries: Mapping[str, dict] | None = None) -> list[dict]:
  """One row per run of ``{method: records}`` (metrics.jsonl's, in order), on top of its
  summary (``summaries[method]``, optional): the fields of the module docstring."""
  names = list(runs)
  ref_name = reference_of(names)
  ref_records = runs[ref_name]
  ref_final = ref_records[-1]["test_accuracy"] if ref_records else None
  target = None if ref_final is None else round(ref_final - TARGET_MARGIN, 12)
  rows = []
  for name in names:
    records = runs[name]
    reached = to_target(records, target) if target is not None else None
    compile_s = sum(r.get("compile_s") or 0.0 for r in records)
    row = dict((summaries or {}).get(name, {}))
    row.update(
        method=name,
        reference=ref_name,
        final_accuracy=records[-1]["test_accuracy"] if records else None,
        total_steps=sum(r["steps"] for r in records),
        total_examples=sum(r["examples"] for r in records),
        target_accuracy=target,
        epoch_to_target=reached and reached["epoch"],
        steps_to_target=reached and reached["steps"],
        examples_to_target=reached and reached["examples"],
        train_time_excl_compile_to_target_s=reached and reached["seconds"],
        train_time_excl_compile_s=sum(r["train_time_s"] for r in records) - compile_s,
        compile_s=compile_s,
        final_batch_size=row.get("final_batch_size", records[-1].get("last_batch_size", records[-1].get("batch_size")) if records else None),
    )
    rows.append(row)
  ref = rows[names.index(ref_name)]
  for row in rows:
    row["verdict"] = _verdict(row, ref)
  return rows


COLUMNS = (
    ("method", "method", "{}"),
    ("final_accuracy", "final acc", "pct"),
    ("total_steps", "total steps", "{:,}"),
    ("total_examples", "total examples", "{:,}"),
    ("steps_to_target", "steps to target", "{:,}"),
    ("examples_to_target", "examples to target", "{:,}"),
    ("train_time_excl_compile_to_target_s", "s to target (no compile)", "{:.1f}"),
    ("train_time_excl_compile_s", "train s (no compile)", "{:.1f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("final_batch_size", "final batch", "{}"),
)


def _cell(value, spec: str) -> str:
  if value is None:
    return "-"
  if spec == "pct":
    return f"{100 * value:.2f}%"
  return spec.format(value)


def table(rows: Sequence[dict]) -> str:
  """The comparison's table (columns of :data:`COLUMNS`, two spaces apart), a legend line
  naming the target, and one verdict line per method."""
  cells = [[_cell(row.get(key), spec) for key, _, spec in COLUMNS] for row in rows]
  heads = [head for _, head, _ in COLUMNS]
  widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
  line = lambda values: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
  lines = [line(heads), "-" * len(line(heads)), *(line(c) for c in cells)]
  if rows:
    ref = next(r for r in rows if r["method"] == r["reference"])
    target = "-" if rows[0]["target_accuracy"] is None else f"{100 * rows[0]['target_accuracy']:.2f}%"
    lines += ["", f"target {target} = {ref['method']}'s final accuracy less {100 * TARGET_MARGIN:.1f} point; "
              "seconds are training seconds without compilation (shown apart: 'compile s')", ""]
    lines += [row["verdict"] for row in rows]
  return "\n".join(lines)
