"""Model boxes of the SAM paper's figure, and the variant registry."""

from .registry import MODEL_REGISTRY, build_model, config_from_state_dict, model_from_state_dict
from .sam import Sam

__all__ = [
    "MODEL_REGISTRY",
    "Sam",
    "build_model",
    "config_from_state_dict",
    "model_from_state_dict",
]
