"""Pack the offline CIFAR-10 as JPEG bytes for a machine without TFDS, and unpack it there.

The GPU machines this project is lent have jax and flax but not
tensorflow-datasets, and only ~64 MiB travel with a command. Raw CIFAR-10 is
180 MB of pixels; its JPEG bytes are ~50 MB. ``pack`` (here) decodes the TFDS
``cifar10_jpeg`` copy and re-encodes every image as JPEG (quality 85, PIL) into one
``.npz`` of bytes + offsets; ``unpack`` (there) decodes them in parallel into the
``npz:PATH`` layout that ``divebatch-train --dataset npz:PATH`` reads.

    python benchmarks/cifar10_jpeg_bundle.py pack .bundle/cifar10_jpeg.npz
    python benchmarks/cifar10_jpeg_bundle.py unpack .bundle/cifar10_jpeg.npz /tmp/cifar10.npz

Re-encoding adds a second JPEG round on top of the mirror's: expect accuracy a
little below the original release's.
"""

from __future__ import annotations

import io
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image


def _encode(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=85)
  return buffer.getvalue()


def _decode(blob: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def pack(out_path: str) -> None:
  from divebatch_jax.data import cifar10  # pylint: disable=g-import-not-at-top

  arrays = {}
  for split in ("train", "test"):
    source = cifar10(split)
    rows = source.arrays if hasattr(source, "arrays") else source.read(np.arange(source.num_examples))
    blobs = [_encode(img) for img in rows["x"]]
    arrays[f"{split}_bytes"] = np.frombuffer(b"".join(blobs), np.uint8)
    arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    arrays[f"y_{split}"] = rows["y"].astype(np.int32)
  np.savez(out_path, **arrays)


def unpack(bundle_path: str, out_path: str) -> None:
  bundle = np.load(bundle_path)
  arrays = {}
  with ProcessPoolExecutor() as pool:
    for split in ("train", "test"):
      data, offsets = bundle[f"{split}_bytes"].tobytes(), bundle[f"{split}_offsets"]
      blobs = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
      arrays[f"x_{split}"] = np.stack(list(pool.map(_decode, blobs, chunksize=512)))
      arrays[f"y_{split}"] = bundle[f"y_{split}"]
  np.savez(out_path, **arrays)


if __name__ == "__main__":
  command, *paths = sys.argv[1:]
  {"pack": pack, "unpack": unpack}[command](*paths)
