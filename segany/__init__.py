"""segany: Segment Anything, complete and fast on a CPU.

>>> from segany import load_predictor
>>> predictor = load_predictor()              # MobileSAM, fetched and cached on first use
>>> predictor.set_image("photo.jpg")
>>> pred = predictor.predict(point_coords=[[120, 80]], point_labels=[1])
"""

from .loader import load_model, load_predictor
from .predictor import Prediction, Predictor, PromptError
from .transforms import ImageError, load_image

__all__ = [
    "ImageError",
    "Prediction",
    "Predictor",
    "PromptError",
    "load_image",
    "load_model",
    "load_predictor",
]
__version__ = "0.1.0"
