"""Flax's MNIST example (nnx CNN with Dropout and BatchNorm, ``nnx.Optimizer``,
``train_step``/``eval_step``, ``nnx.MultiMetric``), twice: ``flax_mnist_style.py`` with
DiveBatch deciding the batch size, ``flax_mnist_style_constant.py`` at a constant one.
``diff examples/flax_mnist_style_constant.py examples/flax_mnist_style.py`` shows what
adaptive batching takes. Data: scikit-learn's 8x8 digits when scikit-learn is installed
(``pip install "divebatch-jax[train]"``), else generated 8x8 images of ten classes (the
first line printed says which). No download. Run either file with ``python``.
"""

import numpy as np
import optax
from flax import nnx


def load_data(seed=0):
  """(train, test): dicts of ``image`` (N, 8, 8, 1) float32 and ``label`` (N,) int32."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    images, labels, source = load_digits().images / 16.0, load_digits().target, "scikit-learn digits"
  except ImportError:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 1800)
    prototypes = rng.uniform(0, 1, (10, 8, 8))
    images, source = prototypes[labels] + 0.3 * rng.normal(size=(1800, 8, 8)), "generated 8x8 images"
  order = np.random.default_rng(seed).permutation(len(labels))
  data = {"image": images[order, :, :, None].astype(np.float32), "label": labels[order].astype(np.int32)}
  cut = len(order) * 4 // 5
  return ({k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}), source


class CNN(nnx.Module):
  """A simple CNN model."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(16, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(32, rngs=rngs)
    self.linear1 = nnx.Linear(32 * 2 * 2, 64, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025, rngs=rngs)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))), (2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.linear2(self.dropout2(nnx.relu(self.linear1(x))))


def loss_fn(model: CNN, batch):
  logits = model(batch["image"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch["label"])
  return losses.mean(), logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch):
  """Train for a single step."""
  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  (loss, logits), grads = grad_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)


@nnx.jit
def eval_step(model: CNN, metrics: nnx.MultiMetric, batch):
  loss, logits = loss_fn(model, batch)
  metrics.update(loss=loss.mean(), logits=logits, labels=batch["label"])


def batches(data, batch_size, seed=None):
  """Batches of ``batch_size`` in a seeded order; the remainder dropped (``drop_remainder=True``)."""
  n = len(data["label"])
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  for start in range(0, n - batch_size + 1, batch_size):
    yield {k: v[order[start:start + batch_size]] for k, v in data.items()}


def main(epochs=10, batch_size=32, learning_rate=0.005, momentum=0.9, echo=print):
  (train, test), source = load_data()
  echo(f"data: {source}, {len(train['label'])} train / {len(test['label'])} test examples")
  model = CNN(rngs=nnx.Rngs(0))
  tx = optax.adamw(learning_rate, momentum)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  history = []
  for epoch in range(epochs):
    model.train()
    for batch in batches(train, batch_size, seed=epoch):
      train_step(model, optimizer, metrics, batch)
    record = {"epoch": epoch, "batch_size": batch_size}
    record.update({f"train_{k}": float(v) for k, v in metrics.compute().items()})
    metrics.reset()
    model.eval()
    for batch in batches(test, 32):
      eval_step(model, metrics, batch)
    record.update({f"test_{k}": float(v) for k, v in metrics.compute().items()})
    metrics.reset()
    history.append(record)
    echo(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
  return history


if __name__ == "__main__":
  main()
