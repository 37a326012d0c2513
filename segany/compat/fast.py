"""The predictor behind the compat classes: segany's fused inference path over a model
that stays the user's."""

from __future__ import annotations

from ..models import Sam
from ..models.fuse import InferenceView
from ..predictor import EmbeddingCache, Predictor


class FastPredictor:
    """A :class:`Predictor` over the :class:`InferenceView` of a user's model: the fused
    copy in eval mode (a new predictor, and so a new embedding, when the weights changed),
    the model itself in training mode. Like the reference, it keeps no embedding cache:
    every ``set_image`` encodes (and no weights fingerprint is computed for cache keys)."""

    def __init__(self, model: Sam) -> None:
        self.view = InferenceView(model)
        self.predictor: Predictor | None = None

    def get(self) -> Predictor:
        model = self.view.current()
        if self.predictor is None or self.predictor.model is not model:
            training = self.view.model.training
            self.predictor = Predictor(
                model, cache=EmbeddingCache(max_items=0), model_id="compat-uncached"
            )
            self.view.model.train(training)  # Predictor puts its model in eval mode
        return self.predictor
