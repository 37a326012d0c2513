"""Image features for decoder training, computed once by the frozen encoder and cached
(on disk by default, shared by every decoder fine-tune of one base model).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..models import Sam
from ..predictor import EmbeddingCache, ImageEmbedding, image_key
from . import family as FAM
from .data import TrainImage


class EmbeddingSource:
    """Image features of a frozen encoder (:func:`.family.embed`), computed once and kept in an
    :class:`~segany.predictor.EmbeddingCache` (on disk when ``cache_dir`` is given) under
    ``enc<encoder hash>-<image content hash>``."""

    def __init__(self, model: Sam, cache_dir: str | Path | None, *, max_items: int = 256) -> None:
        self.model = model
        self.cache = EmbeddingCache(cache_dir, max_items=max_items)
        # the weights behind the cached features (encoder; SAM 2's conv_s0/s1, no_mem_embed),
        # shared by every decoder fine-tune of one base model
        self.prefix = FAM.cache_prefix(model)
        self._keys: dict[str, str] = {}

    def _key(self, image: TrainImage, rgb: np.ndarray) -> str:
        return f"{self.prefix}-{image_key(rgb)}"

    def get(self, image: TrainImage) -> ImageEmbedding:
        key = self._keys.get(image.key)
        if key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        rgb = image.load()
        key = self._key(image, rgb)
        self._keys[image.key] = key
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        item = FAM.embed(self.model, rgb)
        self.cache.put(key, item)
        return item

    def prepare(self, images: Sequence[TrainImage], progress: bool = True) -> float:
        """Embed every image not cached yet; returns the seconds spent."""
        from tqdm import tqdm

        t0 = time.perf_counter()
        for im in tqdm(images, desc="embeddings", unit="img", disable=not progress):
            self.get(im)
        return time.perf_counter() - t0


def default_embedding_cache() -> Path:
    """Where training keeps image embeddings by default (``<segany cache>/embeddings``)."""
    from ..weights import cache_dir

    return cache_dir() / "embeddings"
