"""Host-side data pipeline: sources, epoch sampler, bucket padding, augmentation, prefetch.

Flow of one step: :class:`EpochSampler` picks the next ``min(b, n − p)`` indices
of the epoch's seeded order -> the source reads the stored rows and
:class:`CropFlip` draws their seeded crop/flip parameters -> :func:`pad_to_bucket`
lays both out as ``(K, m)`` rows with a mask -> :class:`Pipeline` transfers them
from :class:`Prefetcher` worker threads and a jitted function augments and
preprocesses them on the device. This package imports NumPy, TFDS and jax only,
never optax.
"""

from divebatch_jax.data.augment import CropFlip, crop_and_flip
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
    default_tfds_dir,
    digits,
    logistic_teacher,
    open_tfds,
    synthetic_logistic,
    tfds_source,
    to_model_batch,
)
from divebatch_jax.data import corpus
from divebatch_jax.data.user_batches import epoch_batches, pad_batch
from divebatch_jax.data.text import ByteVocabulary, TextSource, byte_vocabulary, text_windows, tinyshakespeare_path
