"""Text prompts: open-vocabulary detectors turn class names into boxes, SAM turns the boxes
into masks (the Grounded-SAM recipe). Needs the ``text`` extra (Hugging Face transformers).

>>> from segany.text import TextSegmenter, label_with_classes
>>> seg = TextSegmenter.load(detector="grounding-dino-tiny")
>>> result = seg.segment("photo.jpg", "dog . person")
>>> coco = label_with_classes(["a.jpg", "b.jpg"], "dog . cat", segmenter=seg)
"""

from .detectors import (
    BOX_THRESHOLD,
    DEFAULT_DETECTOR,
    DETECTORS,
    OWL_BOX_THRESHOLD,
    TEXT_THRESHOLD,
    Detections,
    Detector,
    DetectorError,
    DetectorSpec,
    DetectorWeightsError,
    GroundingDinoDetector,
    OwlDetector,
    detectors_dir,
    load_detector,
    setup_command,
)
from .pipeline import (
    MAX_DETECTIONS,
    NMS_THRESHOLD,
    TextSegmentation,
    TextSegmenter,
    categories_for,
    class_nms,
    coco_writer,
    label_with_classes,
    parse_queries,
)

__all__ = [
    "BOX_THRESHOLD",
    "DEFAULT_DETECTOR",
    "DETECTORS",
    "MAX_DETECTIONS",
    "NMS_THRESHOLD",
    "OWL_BOX_THRESHOLD",
    "TEXT_THRESHOLD",
    "Detections",
    "Detector",
    "DetectorError",
    "DetectorSpec",
    "DetectorWeightsError",
    "GroundingDinoDetector",
    "OwlDetector",
    "TextSegmentation",
    "TextSegmenter",
    "categories_for",
    "class_nms",
    "coco_writer",
    "detectors_dir",
    "label_with_classes",
    "load_detector",
    "parse_queries",
    "setup_command",
]
