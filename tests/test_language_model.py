"""Language models end to end: text windows, integer inputs through the pipeline, the GPT,
per-token losses, the warmup + cosine rate, decisions every N steps, and the CLI on
tinyshakespeare."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import run_records, write_cbs_file
import divebatch_jax as dbj
from divebatch_jax import data, policies
from divebatch_jax.train import gpt, main, methods, models, optim
from divebatch_jax.train.config import TrainConfig
from divebatch_jax.train.methods import NAMES as METHODS

TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 8
needs_shakespeare = pytest.mark.skipif(
    not (data.sources.default_data_dir() / "text" / "tinyshakespeare.txt").is_file(),
    reason="../shared/data/text/tinyshakespeare.txt is not here",
)


# ------------------------------------------------------------------ text windows


@pytest.mark.parametrize("context, stride", [(8, None), (5, 3), (1, 1)])
def test_text_windows_are_the_texts_slices_and_their_next_tokens(context, stride):
  train = data.text_windows(TEXT, context, stride=stride)
  symbols = sorted(set(TEXT))
  cut = int(len(TEXT) * 0.9)
  ids = [symbols.index(c) for c in TEXT[:cut]]
  step = stride or context
  starts = range(0, len(ids) - context, step)  # brute force: every window with a next token
  assert train.num_examples == len(starts) and train.num_classes == len(symbols)
  batch = train.gather(range(train.num_examples))
  assert batch["x"].dtype == np.int32 and batch["y"].shape == (len(starts), context)
  for j, s in enumerate(starts):
    assert batch["x"][j].tolist() == ids[s:s + context]
    assert batch["y"][j].tolist() == ids[s + 1:s + context + 1]
  assert train.vocabulary.decode(batch["x"][0]) == TEXT[:context].decode()


def test_validation_split_is_the_last_tenth_with_the_shared_vocabulary(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(TEXT)
  test = data.text_windows(path, 4, split="validation")
  cut = int(len(TEXT) * 0.9)
  assert test.vocabulary == data.byte_vocabulary(TEXT)
  assert test.vocabulary.decode(test.gather([0])["x"][0]) == TEXT[cut:cut + 4].decode()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(context=10_000), ValueError, r"fewer than context \+ 1"),
        (dict(context=0), ValueError, r"context must be an int in >= 1"),
        (dict(context=4, split="test"), ValueError, r"split must be one of \('train', 'validation'\)"),
        (dict(context=4, validation_fraction=1.0), ValueError, r"validation_fraction must be in \(0, 1\)"),
    ],
)
def test_text_windows_errors_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    data.text_windows(TEXT, **kwargs)


def test_missing_text_file_and_corpus_are_one_clear_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.text_windows(tmp_path / "absent.txt", 4)
  with pytest.raises(FileNotFoundError, match="tinyshakespeare was not found"):
    data.tinyshakespeare_path(tmp_path)


def test_vocabulary_refuses_unknown_bytes():
  with pytest.raises(ValueError, match=r"byte 122 \('z'\)"):
    data.byte_vocabulary(b"abc").encode("abz")


@pytest.mark.parametrize("resident", [True, False])
def test_pipeline_keeps_token_ids_integer_and_targets_per_token(resident):
  source = data.text_windows(TEXT, 6)
  pipeline = data.Pipeline(source, ladder=data.bucket_ladder(8, 8), seed=0, resident=resident, prefetch=0)
  batch = pipeline.next_batch(5)
  (micro, mask), = batch.micro_batches
  assert micro["x"].dtype == jnp.int32 and micro["y"].dtype == jnp.int32
  assert micro["x"].shape == micro["y"].shape == (8, 6)
  rows = np.asarray(micro["x"])[np.asarray(mask)]
  order = data.epoch_order(source.num_examples, 0, 0)[:5]
  assert np.array_equal(rows, source.gather(order)["x"])


# ------------------------------------------------------------------ the model


def _tiny_gpt(**changes):
  size = gpt.GPTSize(depth=2, width=16, heads=2, context=8)._replace(**changes)
  return gpt.GPT(size, vocab_size=11, seed=0)


def test_gpt_is_causal_and_its_head_is_the_token_table():
  model = _tiny_gpt()
  x = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)
  changed = x.at[:, 5].set((x[:, 5] + 1) % 11)
  a, b = model(x), model(changed)
  assert a.shape == (2, 8, 11)
  assert jnp.max(jnp.abs(a[:, :5] - b[:, :5])) == 0.0 and jnp.max(jnp.abs(a[:, 5:] - b[:, 5:])) > 0
  _, params, _ = models.split_model(model)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert [p for p, v in leaves if v.shape == (11, 16)] and not [p for p, v in leaves if v.shape == (16, 11)]
  assert params["blocks"]["qkv"]["kernel"].shape == (2, 16, 48)  # stacked by nnx.vmap


def test_gpt_scan_and_unrolled_blocks_agree():
  x = jax.random.randint(jax.random.key(1), (3, 8), 0, 11)
  np.testing.assert_allclose(_tiny_gpt()(x), _tiny_gpt(unroll=True)(x), rtol=1e-5, atol=1e-5)


def test_gpt_sizes_span_cpu_and_gpu_presets():
  counts = {}
  for name, size in gpt.GPT_SIZES.items():
    abstract = nnx.eval_shape(lambda: gpt.GPT(size, vocab_size=65, seed=0))
    counts[name] = models.param_count(nnx.state(abstract, nnx.Param))
  assert 1e5 <= counts["gpt"] <= 1e6 and 1e5 <= counts["gpt-small"] <= 1e6
  assert 9e6 <= counts["gpt-10m"] <= 12e6


def test_per_token_loss_is_the_mean_token_cross_entropy_in_float64():
  logits = np.random.default_rng(0).normal(size=(3, 4, 5))
  labels = np.random.default_rng(1).integers(0, 5, (3, 4))
  got = models.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.take_along_axis(log_softmax, labels[..., None], -1)[..., 0].mean(1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gpt_rejects_float_inputs_in_one_line():
  with pytest.raises(ValueError, match=r"x must be \(B, T\) integer token ids"):
    _tiny_gpt()(jnp.zeros((2, 8)))


# ------------------------------------------------------------------ learning rate


def test_warmup_then_cosine_over_examples_is_the_closed_form():
  config = TrainConfig(lr=0.01, warmup_steps=10, schedule="cosine-examples", epochs=2)
  n = 1000
  for step, examples in [(0, 0), (4, 80), (9, 300), (50, 1000), (80, 2000)]:
    want = 0.01 * min(1, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * examples / 2000))
    got = optim.learning_rate(config, epoch=examples // n, step=step, examples=examples, num_examples=n)
    assert got == pytest.approx(want, rel=1e-12)
  assert optim.sets_rate_per_step(config) and not optim.sets_rate_per_step(TrainConfig())


def test_adamw_with_clipping_is_optax_adamw_on_the_clipped_gradient():
  config = TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.1, clip_norm=1.0, method="sgd", batch_size=4)
  tx = optim.make_optimizer(config, 100, methods.build_policy(config))
  params = {"w": jnp.array([1.0, -2.0])}
  grad = {"w": jnp.array([3.0, 4.0])}  # norm 5: clipped to norm 1
  updates, _ = tx.update(grad, tx.init(params), params, count=4)
  reference = optax.adamw(0.1, b1=0.9, b2=0.99, weight_decay=0.1)
  want, _ = reference.update({"w": grad["w"] / 5}, reference.init(params), params)
  np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)


# ------------------------------------------------------------------ decisions every N steps


def _linear_problem(n=120):
  rng = np.random.default_rng(0)
  source = data.ArraySource(
      {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": rng.integers(0, 2, n).astype(np.int32)},
      num_classes=2,
  )
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(batch["x"]), batch["y"])

  return source, params, loss_fn


def _one_epoch(policy, source, params, loss_fn):
  """One epoch of a loop reading the batch size before every step: (sizes used, state)."""
  tx = dbj.adaptive_batch(optax.sgd(0.0), policy, num_examples=source.num_examples, base_batch_size=8)
  step = dbj.train_step(loss_fn, tx, method="exact", policy=policy)
  state = step.init(jax.tree.map(jnp.copy, params))
  sizes, seen = [], []
  with data.Pipeline(source, ladder=data.bucket_ladder(8, 64), seed=0, prefetch=0) as pipeline:
    for batch in pipeline.epoch(0, lambda: dbj.current_batch_size(state.opt_state)):
      sizes.append(dbj.current_batch_size(state.opt_state))
      state, _ = step(state, batch.data, batch.mask, epoch=0)
      seen.extend(np.asarray(batch.data["x"])[np.asarray(batch.mask)].tolist())
  assert sorted(map(tuple, seen)) == sorted(map(tuple, source.arrays["x"].tolist()))  # exactly once
  return sizes, dbj.batch_state_summary(state.opt_state)


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda n: policies.divebatch(0.5, 8, resize_every_steps=n),
        lambda n: policies.norm_test(0.5, 8, every=n),
        lambda n: policies.noise_scale(1.0, max_batch_size=8, every=n),
    ],
    ids=["divebatch", "norm_test", "noise_scale"],
)
@pytest.mark.parametrize("every", [1, 3, 7])
def test_a_loop_deciding_every_n_steps_makes_floor_steps_over_n_decisions_per_epoch(make_policy, every):
  source, params, loss_fn = _linear_problem()
  policy = make_policy(every)
  assert policy.decision_steps == every
  sizes, summary = _one_epoch(policy, source, params, loss_fn)
  assert sizes == [8] * 15 and summary["epoch"] == 1  # b_max = b0: 120 / 8 steps
  assert summary["decisions"] == 15 // every


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda n: policies.adabatch(2, 100, max_batch_size=64, every_steps=n),
        lambda n: policies.sebs(2, 100, 64, stage_steps=n),
    ],
    ids=["adabatch", "sebs"],
)
@pytest.mark.parametrize("every", [1, 2, 5])
def test_schedules_in_steps_double_after_every_nth_step(make_policy, every):
  source, params, loss_fn = _linear_problem()
  sizes, summary = _one_epoch(make_policy(every), source, params, loss_fn)
  assert sizes == [min(8 * 2 ** (s // every), 64) for s in range(len(sizes))]
  assert summary["decisions"] == min(len(sizes) // every, 3)  # 8 -> 16 -> 32 -> 64


def test_step_cadence_divebatch_uses_the_windows_examples_in_place_of_n():
  source, params, loss_fn = _linear_problem(n=64)
  policy = policies.divebatch(0.5, 64, resize_every_steps=2)
  tx = dbj.adaptive_batch(optax.sgd(0.0), policy, num_examples=64, base_batch_size=8)
  step = dbj.train_step(loss_fn, tx, method="exact", policy=policy)
  state = step.init(jax.tree.map(jnp.copy, params))
  batch = source.gather(range(16))
  grads = jax.vmap(lambda b: jax.grad(lambda p: loss_fn(p, jax.tree.map(lambda v: v[None], b))[0])(params))(batch)
  flat = np.concatenate([np.asarray(g, np.float64).reshape(16, -1) for g in jax.tree.leaves(grads)], 1)
  diversity = (flat**2).sum() / (flat.sum(0) ** 2).sum()
  for rows in (range(8), range(8, 16)):
    state, _ = step(state, source.gather(rows), epoch=0)
  summary = dbj.batch_state_summary(state.opt_state)
  assert summary["requested"] == pytest.approx(0.5 * 16 * diversity, rel=1e-4)
  assert summary["batch_size"] == min(64, max(8, math.floor(0.5 * 16 * diversity)))


# ------------------------------------------------------------------ the CLI


LM = [
    "--dataset", "tinyshakespeare", "--model", "gpt", "--optimizer", "adamw", "--lr", "3e-3",
    "--weight-decay", "0.1", "--warmup-steps", "10", "--clip-norm", "1", "--schedule", "cosine-examples",
    "--context", "32", "--num-test-examples", "128", "--batch-size", "8", "--max-batch-size", "64",
    "--device-batch", "16", "--resize-every-steps", "15", "--test-every", "5",
]


@needs_shakespeare
@pytest.mark.slow
@pytest.mark.parametrize("method", ["divebatch", "norm-test"])
def test_cli_char_gpt_learns_and_changes_the_batch_size(method, tmp_path):
  out = tmp_path / method
  args = LM + ["--method", method, "--epochs", "2", "--num-examples", "1200", "--out", str(out)]
  assert main(args + (["--eta", "0.2"] if method == "norm-test" else [])) == 0
  records = run_records(out)
  assert len(records) == 2
  for r in records:
    assert math.isfinite(r["test_loss"]) and r["tokens"] == 1200 * 32
    assert r["bits_per_char"] == pytest.approx(r["test_loss"] / math.log(2))
  assert records[-1]["total_tokens"] == 2 * 1200 * 32
  assert records[-1]["test_loss"] < math.log(65) - 1
  assert max(r["next_batch_size"] for r in records) > 8
  summary = json.loads((out / "summary.json").read_text())  # the records and the summary agree
  assert summary["final_batch_size"] == records[-1]["last_batch_size"] >= records[-1]["batch_size"]
  assert summary["final_test_loss"] == records[-1]["test_loss"]
  assert summary["final_bits_per_char"] == pytest.approx(records[-1]["test_loss"] / math.log(2))
  assert summary["total_tokens"] == records[-1]["total_tokens"]


@needs_shakespeare
@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("divebatch", "norm-test")])
def test_every_cli_method_runs_on_the_char_gpt(method, tmp_path):
  out = tmp_path / method
  args = LM + ["--method", method, "--epochs", "1", "--num-examples", "400", "--out", str(out)]
  if method == "cbs-warmup":  # a critical-batch-size curve: 8 at the start, 32 after 200 windows
    args += ["--cbs-file", str(write_cbs_file(tmp_path / "cbs.json", [0, 200], [8, 32]))]
  assert main(args) == 0
  (record,) = run_records(out)
  assert math.isfinite(record["test_loss"]) and record["test_loss"] < math.log(65)


def test_text_dataset_flag_reads_any_file(tmp_path):
  path = tmp_path / "mine.txt"
  path.write_bytes(TEXT * 4)
  out = tmp_path / "run"
  args = ["--dataset", f"text:{path}", "--model", "gpt", "--context", "8", "--method", "sgd",
          "--optimizer", "adamw", "--lr", "1e-2", "--epochs", "1", "--batch-size", "16",
          "--device-batch", "16", "--out", str(out)]
  assert main(args) == 0
  (record,) = run_records(out)
  assert record["tokens"] == record["examples"] * 8 and math.isfinite(record["test_loss"])


def test_missing_corpus_is_one_error_line(tmp_path, capsys):
  status = main(["--dataset", "tinyshakespeare", "--model", "gpt", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
  assert status == 2
  err = capsys.readouterr().err
  assert err.startswith("error: tinyshakespeare was not found") and err.count("\n") == 1


def test_norm_test_under_adamw_grows_the_batch_and_leaves_the_adam_step_alone():
  """Lau et al.'s setting: the batch grows by the norm test, the Adam rate stays on its schedule
  (lr_rule "none"): every update equals optax.adamw's on the same mean gradients."""
  source, params, loss_fn = _linear_problem(n=64)
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, b1=0.9, b2=0.99, weight_decay=0.1)
  tx = dbj.adaptive_batch(inner, policies.norm_test(0.05, 64, every=1), num_examples=64, base_batch_size=8)
  reference = optax.adamw(1e-2, b1=0.9, b2=0.99, weight_decay=0.1)
  state, ref_state = tx.init(params), reference.init(params)
  p = q = params
  sizes = []
  for start in (0, 8):
    batch = source.gather(range(start, start + 8))
    loss, grad, stats = dbj.gradient_stats(loss_fn, p, batch, method="exact")
    updates, state = tx.update(grad, state, p, stats=stats)
    ref_updates, ref_state = reference.update(grad, ref_state, q)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    p, q = optax.apply_updates(p, updates), optax.apply_updates(q, ref_updates)
    summary = dbj.batch_state_summary(state)
    sizes.append(summary["batch_size"])
    assert summary["lr_scale"] == 1.0 and summary["learning_rate"] == pytest.approx(1e-2)
  assert sizes[-1] > 8, "the norm test never asked for a larger batch"


@pytest.mark.slow
def test_a_step_cadence_run_resumed_from_its_epoch_one_checkpoint_repeats_epoch_two(tmp_path):
  """Per-step rate and decisions every N steps of the run: a resume from epoch 1 gives the
  uninterrupted run's epoch 2 (every field but the timings)."""
  path = tmp_path / "mine.txt"
  path.write_bytes(TEXT * 6)
  out = tmp_path / "run"
  args = ["--dataset", f"text:{path}", "--model", "gpt", "--context", "8", "--method", "divebatch",
          "--optimizer", "adamw", "--lr", "1e-2", "--warmup-steps", "5", "--schedule", "cosine-examples",
          "--clip-norm", "1", "--resize-every-steps", "7", "--epochs", "2", "--batch-size", "4",
          "--max-batch-size", "32", "--device-batch", "16", "--checkpoint-every", "1", "--out", str(out)]
  assert main(args) == 0
  uninterrupted = run_records(out)
  assert uninterrupted[0]["next_batch_size"] != 4 or uninterrupted[1]["next_batch_size"] != 4
  metrics_file = out / "metrics.jsonl"
  metrics_file.write_text(metrics_file.read_text().splitlines()[0] + "\n")
  for step_dir in (out / "checkpoints").glob("step_00000002"):
    for f in sorted(step_dir.rglob("*"), reverse=True):
      f.unlink() if f.is_file() else f.rmdir()
    step_dir.rmdir()
  assert main(args + ["--resume"]) == 0
  resumed = run_records(out)
  timing = {"train_time_s", "eval_time_s", "compilations", "compile_s", "compile_stall_s"}
  for key, value in uninterrupted[1].items():
    if key not in timing:
      assert resumed[1][key] == value, key


@pytest.mark.parametrize("dataset", ["tinyshakespeare", "text:/a.txt"])
def test_text_data_defaults_to_the_gpt_its_rate_and_decisions_in_steps(dataset):
  from divebatch_jax.train import config as config_lib

  filled = config_lib.with_defaults(TrainConfig(dataset=dataset))
  assert (filled.model, filled.lr, filled.resize_every_steps) == ("gpt", 3e-3, config_lib.TEXT_DECISION_STEPS)
  kept = config_lib.with_defaults(TrainConfig(dataset=dataset, model="gpt-small", lr=0.01, resize_every_steps=7))
  assert (kept.model, kept.lr, kept.resize_every_steps) == ("gpt-small", 0.01, 7)
  assert config_lib.with_defaults(TrainConfig(dataset="digits")).resize_every_steps is None
