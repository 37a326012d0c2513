"""Model boxes of the SAM paper's figure, and the variant registry."""

from .registry import MODEL_REGISTRY, build_model, config_from_state_dict, model_from_state_dict
from .sam import Sam
from .sam2 import Sam2
from .sam_hq import SamHQ

__all__ = [
    "MODEL_REGISTRY",
    "Sam",
    "Sam2",
    "SamHQ",
    "build_model",
    "config_from_state_dict",
    "model_from_state_dict",
]
