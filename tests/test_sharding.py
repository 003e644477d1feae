"""Sharded parameters: the step's state follows the parameters' shardings (issue 32).

On 8 simulated CPU devices (a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, as in test_parallel.py), a GPT
with rematerialised blocks runs 5 DiveBatch steps under FSDP (``data=2,fsdp=4``) and
tensor parallelism (``data=2,model=4``), plain and instrumented, one micro-batch (one
fused call) and two (accumulate + apply), compiled ahead by ``precompile``; the
reference is the same run on one device.
"""

import json

import numpy as np
import pytest

from conftest import run_records
from test_parallel import _assert_same_run, _run_python, _single_process, _two_processes

RUN_CODE = """
import json
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import divebatch_jax as dbj
from divebatch_jax import policies
from divebatch_jax.data import Batch
from divebatch_jax.train import gpt, parallel

assert jax.device_count() == 8
MESH, UNROLL = {mesh!r}, {unroll!r}
model = gpt.GPT(gpt.GPTSize(depth=2, width=32, heads=4, context=8, unroll=UNROLL, remat=True), vocab_size=16, seed=0)
graphdef, params = nnx.split(model, nnx.Param)

def loss_fn(p, batch):
  logits = nnx.merge(graphdef, p)(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(-1)

rng = np.random.default_rng(0)
tokens = rng.integers(0, 16, (5, 16, 9)).astype(np.int32)
masks = np.arange(16)[None] < np.array([16, 13, 16, 11, 14])[:, None]   # padded rows hold tokens too
# (instrumented, micro-batches) of the 5 steps: plain and instrumented, K = 1 and K = 2.
SCHEDULE = [(False, 1), (True, 1), (True, 2), (False, 2), (True, 1)]

def batch_of(i, sharding):
  data = {{"x": tokens[i, :, :-1], "y": tokens[i, :, 1:]}}
  k = SCHEDULE[i][1]
  parts = [(jax.tree.map(lambda a: a[j::k], data), masks[i, j::k]) for j in range(k)]
  put = (lambda t: jax.device_put(t, sharding)) if sharding is not None else (lambda t: jax.tree.map(jnp.asarray, t))
  return Batch(tuple(put(p) for p in parts), int(masks[i].sum()), None, False)

def run(mesh):
  policy = policies.divebatch(0.5, 64, resize_every=1)
  tx = dbj.adaptive_batch(optax.sgd(0.3), policy, num_examples=64, base_batch_size=16)
  step = dbj.train_step(loss_fn, tx, policy=policy, fuse=True)
  p, sharding = params, None
  if mesh is not None:
    p = parallel.shard(params, parallel.param_shardings(params, mesh))
    sharding = parallel.batch_sharding(mesh)
  state = step.init(p)
  initial = [x.sharding for x in jax.tree.leaves(state)]
  out = {{"losses": [], "sizes": [], "kept": []}}
  if mesh is not None:   # every executable the 5 steps need, compiled ahead
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    one, two = batch_of(0, sharding).micro_batches[0], batch_of(2, sharding).micro_batches[0]
    abstract = lambda pair: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), pair)
    step.precompile(shapes, layouts=[abstract(one)], micro_batch=abstract(two))
  with dbj.CompileCounter() as compiles:
    for i, (instrumented, _) in enumerate(SCHEDULE):
      state, o = step.run(state, batch_of(i, sharding), stats=instrumented)
      out["losses"].append(float(o.loss))
      out["sizes"].append(dbj.current_batch_size(state.opt_state))
      out["kept"].append([x.sharding for x in jax.tree.leaves(state)] == initial)
  out["compiles"] = compiles.count
  out["params"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)]).tolist()
  rule = state.opt_state.policy_state.epoch_stats
  out["sum_g"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(rule.sum_g)]).tolist()
  if mesh is not None:
    pairs = zip(jax.tree.leaves(rule.sum_g), jax.tree.leaves(state.params))
    out["sum_g_like_params"] = all(g.sharding.spec == w.sharding.spec for g, w in pairs)
    scalars = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    out["scalars_replicated"] = all(x.sharding.spec == jax.sharding.PartitionSpec() and x.sharding.mesh == mesh for x in scalars)
    local = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
    out["sum_g_bytes_per_device"] = local(rule.sum_g)
    out["sum_g_bytes"] = sum(x.nbytes for x in jax.tree.leaves(rule.sum_g))
    out["params_bytes_per_device"] = local(state.params)
  return out

mesh = parallel.make_axes_mesh(parallel.parse_mesh(MESH))
print(json.dumps({{"one": run(None), "sharded": run(mesh)}}))
"""


def _runs(mesh: str, unroll) -> tuple[dict, dict]:
  result = json.loads(_run_python(RUN_CODE.format(mesh=mesh, unroll=unroll)).strip().splitlines()[-1])
  return result["one"], result["sharded"]


@pytest.mark.parametrize(
    "mesh, unroll",
    [("data=2,fsdp=4", 1), pytest.param("data=2,model=4", True, marks=pytest.mark.slow)],  # ~1 min each
    ids=["fsdp", "tp"],
)
def test_sharded_divebatch_steps_equal_one_device_and_keep_their_shardings(mesh, unroll):
  one, sharded = _runs(mesh, unroll)
  assert sharded["kept"] == [True] * 5
  assert sharded["compiles"] == 0  # precompile covered every step: no "compiled for other shardings"
  assert sharded["sum_g_like_params"] and sharded["scalars_replicated"]
  # The rule's parameter-shaped sum is sharded: a device holds less than the whole of it.
  assert sharded["sum_g_bytes_per_device"] < 0.75 * sharded["sum_g_bytes"]
  assert sharded["sizes"] == one["sizes"]
  assert len(set(one["sizes"])) > 1  # the rule resized within the 5 steps
  np.testing.assert_allclose(sharded["losses"], one["losses"], rtol=1e-5)
  for key in ("params", "sum_g"):
    a, b = np.asarray(one[key]), np.asarray(sharded[key])
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), key


CLI_ARGS = [
    "--dataset", "tinyshakespeare", "--model", "gpt", "--method", "divebatch", "--context", "16",
    "--num-examples", "512", "--num-test-examples", "64", "--epochs", "3", "--batch-size", "16",
    "--max-batch-size", "128", "--resize-every-steps", "16", "--delta", "8", "--stats-method", "exact",
    "--device-batch", "32",  # pinned: the runs are compared
]


@pytest.mark.slow
def test_cli_on_a_2d_fsdp_mesh_with_remat_equals_the_data_parallel_run(tmp_path):
  code = f"""
from divebatch_jax.train import main
args = {CLI_ARGS!r}
assert main(args + ["--mesh", "data=2,fsdp=4", "--remat", "--out", {str(tmp_path / "fsdp")!r}]) == 0
assert main(args + ["--mesh", "data=8", "--out", {str(tmp_path / "data")!r}]) == 0
"""
  _run_python(code)
  fsdp, data = run_records(tmp_path / "fsdp"), run_records(tmp_path / "data")
  assert len(fsdp) == len(data) == 3
  assert {r["mesh"] for r in fsdp} == {"data=2,fsdp=4"} and {r["mesh"] for r in data} == {"data=8"}
  assert len({r["batch_size"] for r in data}) > 1  # the rule resized
  _assert_same_run(data, fsdp)


@pytest.mark.slow
def test_two_processes_on_a_2d_fsdp_mesh_equal_one_process(tmp_path):
  """Two JAX processes of 2 CPU devices each, mesh data=2,fsdp=2 (parameters sharded
  across the processes), against one process of 4 devices on the same mesh."""
  args = [a for a in CLI_ARGS if a not in ("--epochs", "3")] + ["--epochs", "2", "--mesh", "data=2,fsdp=2", "--remat"]
  _two_processes(args + ["--out", str(tmp_path / "multi")])
  _single_process(args + ["--out", str(tmp_path / "single")])
  single = run_records(tmp_path / "single")
  for folder in (tmp_path / "multi", tmp_path / "multi" / "process_1"):
    records = run_records(folder)
    _assert_same_run(single, records)
    assert {r["processes"] for r in records} == {2} and {r["mesh"] for r in records} == {"data=2,fsdp=2"}


@pytest.mark.parametrize("text", ["data=0", "rows=2", "data=2,data=2", "data", "data=2;fsdp=4"])
def test_a_bad_mesh_is_refused_in_one_line_naming_the_flag(text):
  from divebatch_jax.train import parallel

  with pytest.raises(ValueError, match="^--mesh must be comma-separated AXIS=SIZE") as err:
    parallel.parse_mesh(text)
  assert "\n" not in str(err.value)


def test_gpt_parameters_carry_logical_axes_and_the_mesh_maps_them():
  import jax
  from flax import nnx
  from divebatch_jax.train import gpt, parallel

  model = gpt.GPT(gpt.GPTSize(depth=2, width=16, heads=2, context=8), vocab_size=11, seed=0)
  params = nnx.state(model, nnx.Param)
  names = {jax.tree_util.keystr(p): v.get_metadata()["out_sharding"]
           for p, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert names["['blocks']['qkv']['kernel']"] == ("layers", "embed", "heads")
  assert names["['blocks']['out']['kernel']"] == ("layers", "mlp", "embed")
  assert names["['tokens']['embedding']"] == ("vocab", "embed")
  # On a 1-device mesh every axis has size 1: everything stays whole, nothing is warned about.
  mesh = parallel.make_axes_mesh({"data": 1, "fsdp": 1, "model": 1})
  specs = [s.spec for s in jax.tree.leaves(parallel.param_shardings(params, mesh))]
  assert all(all(a is None for a in spec) for spec in specs)
  assert parallel._spec(("layers", "embed", "mlp"), (2, 16, 64), _FakeMesh(fsdp=4, model=4), set()) == \
      jax.sharding.PartitionSpec(None, "fsdp", "model")
  skipped = set()
  assert parallel._spec(("vocab", "embed"), (11, 18), _FakeMesh(fsdp=4), skipped) == jax.sharding.PartitionSpec(None, None)
  assert skipped == {"embed (18 rows over fsdp=4)"}


class _FakeMesh:
  """A mesh's ``shape`` alone (the rule table reads nothing else)."""

  def __init__(self, **shape):
    self.shape = shape


def test_bfloat16_compute_stays_within_bfloat16_error_of_float32():
  import jax
  import jax.numpy as jnp
  from divebatch_jax.train import models

  tokens = jnp.arange(2 * 16).reshape(2, 16) % 65
  logits = {}
  for dtype in ("float32", "bfloat16"):
    model = models.create_model("gpt", input_shape=(16,), num_classes=65, seed=0, dtype=dtype)
    graphdef, params, rest = models.split_model(model)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}  # parameters stay float32
    logits[dtype] = models.forward(graphdef, params, rest, tokens, train=False)[0]
  assert logits["bfloat16"].dtype == jnp.float32
  error = float(jnp.max(jnp.abs(logits["bfloat16"] - logits["float32"])))
  assert 0 < error <= 0.05 * float(jnp.max(jnp.abs(logits["float32"])))


@pytest.mark.slow
def test_an_fsdp_run_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path):
  """The checkpoint of a sharded state restores onto the same shardings: 1 epoch, then
  --resume to 2, equals 2 epochs in one go (mesh data=2,fsdp=4)."""
  args = [a for a in CLI_ARGS if a not in ("--epochs", "3")] + ["--mesh", "data=2,fsdp=4", "--checkpoint-every", "1"]
  code = f"""
from divebatch_jax.train import main
args = {args!r}
assert main(args + ["--epochs", "1", "--out", {str(tmp_path / "cut")!r}]) == 0
assert main(args + ["--epochs", "2", "--resume", "--out", {str(tmp_path / "cut")!r}]) == 0
assert main(args + ["--epochs", "2", "--out", {str(tmp_path / "whole")!r}]) == 0
"""
  _run_python(code)
  _assert_same_run(run_records(tmp_path / "whole"), run_records(tmp_path / "cut"))
