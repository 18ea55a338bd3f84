"""Data: image-caption sources, TFDS datasets in array_record, the grain input pipeline, and
``prepare`` (images + captions -> VAE latents + text embeddings).

Typical use::

    build_image_dataset("pics/", "data/images")             # optional: a clean, indexed copy
    prepare("data/images", "data/latents", pipeline=pipe)   # encoders run once, resumable
    it = iter(make_dataset("data/latents", batch_size=32, seed=0))
    batch = next(it); state = it.get_state()                # save with the checkpoint

``prepare`` is imported from :mod:`distill_jax.data.prepare` (it pulls in the models).
"""

from distill_jax.data.builders import (
    WriteReport,
    build_image_dataset,
    load_info,
    write_dataset,
)
from distill_jax.data.input_pipeline import make_dataset
from distill_jax.data.sources import open_source

__all__ = [
    "WriteReport",
    "build_image_dataset",
    "load_info",
    "make_dataset",
    "open_source",
    "write_dataset",
]
