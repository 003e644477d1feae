"""Host-side data pipeline: sources, epoch sampler, bucket padding, augmentation, prefetch.

Flow of one step: :class:`EpochSampler` picks the next ``min(b, n − p)`` indices
of the epoch's seeded order -> the source gathers (and :class:`CropFlip`
augments) them -> :func:`pad_to_bucket` lays them out as ``(K, m)`` rows with a
mask -> :class:`Pipeline` puts them on device from a :class:`Prefetcher` thread.
This package imports NumPy, TFDS and jax's device transfer only, never optax.
"""

from divebatch_jax.data.augment import CropFlip, crop_and_flip, random_crop_flip
from divebatch_jax.data.buckets import (
    BucketLadder,
    bucket_ladder,
    micro_batch_counts,
    pad_to_bucket,
    padding_fraction,
    worst_case_padding,
)
from divebatch_jax.data.pipeline import Batch, PaddingLog, Pipeline
from divebatch_jax.data.prefetch import Prefetcher
from divebatch_jax.data.sampler import (
    EpochSampler,
    SamplerState,
    advance,
    check_batch_size,
    epoch_order,
)
from divebatch_jax.data.sources import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ArraySource,
    ArraySpec,
    ImagePreprocess,
    StreamingSource,
    cifar10,
    default_data_dir,
    digits,
    logistic_teacher,
    open_tfds,
    synthetic_logistic,
    tfds_source,
)
