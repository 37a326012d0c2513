"""Label Studio's labeling configuration (the project's XML ``label_config``), read with the
standard library: which image the masks are for, which control tags take segany's answers
(``BrushLabels`` -> brush masks, ``PolygonLabels`` -> polygons) and which carry the user's
prompts (smart ``KeyPointLabels`` / ``RectangleLabels``).

The tags and attributes are Label Studio's (https://labelstud.io/tags/): an object tag
``<Image name="image" value="$image"/>`` names the task's data key (``$image`` ->
``task["data"]["image"]``); a control tag ``<BrushLabels name="tag" toName="image">`` holds
``<Label value="Cat"/>`` children (``predicted_values="cat, kitten"`` maps model class
names to a label).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

#: Control tags whose regions segany writes, in the order they are preferred.
OUTPUT_TAGS = ("BrushLabels", "PolygonLabels")
#: Control tags whose regions are prompts (with ``smart="true"`` in interactive mode).
PROMPT_TAGS = ("KeyPointLabels", "RectangleLabels")
#: Label Studio's result ``type`` of each control tag.
RESULT_TYPES = {
    "BrushLabels": "brushlabels",
    "PolygonLabels": "polygonlabels",
    "KeyPointLabels": "keypointlabels",
    "RectangleLabels": "rectanglelabels",
}
_MAX_CONFIG = 1 << 20


class ConfigError(ValueError):
    """A label config segany cannot answer for (no image, no brush or polygon control...)."""


@dataclass(frozen=True)
class Control:
    """One control tag: ``name`` (the result's ``from_name``), ``tag`` (``BrushLabels``...),
    ``to_name`` (the image's name), its labels and their ``predicted_values`` aliases."""

    name: str
    tag: str
    to_name: str
    labels: tuple[str, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # model class -> label
    smart: bool = False

    @property
    def result_type(self) -> str:
        return RESULT_TYPES[self.tag]

    def label_for(self, wanted: str | None) -> str | None:
        """The label of this control matching ``wanted`` (its value, a ``predicted_values``
        alias, or the value without case), else its first label (``None`` if it has none)."""
        if wanted is not None:
            if wanted in self.labels:
                return wanted
            key = wanted.strip().lower()
            if key in self.aliases:
                return self.aliases[key]
            for label in self.labels:
                if label.lower() == key:
                    return label
        return self.labels[0] if self.labels else None


@dataclass(frozen=True)
class LabelConfig:
    """The parts of a label config segany uses: ``images`` (object name -> data key) and
    the ``controls`` that read from an image, in the config's order."""

    images: dict[str, str]
    controls: tuple[Control, ...]

    def output_for(self, image: str | None = None) -> Control:
        """The control segany answers with for ``image`` (default: the first image with
        one): the first ``BrushLabels`` on it, else the first ``PolygonLabels``."""
        for tag in OUTPUT_TAGS:
            for c in self.controls:
                if c.tag == tag and (image is None or c.to_name == image):
                    return c
        where = f" on the image {image!r}" if image else ""
        raise ConfigError(
            f"the label config has no BrushLabels or PolygonLabels control{where}: add e.g. "
            '<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>'
        )

    def control(self, name: str) -> Control | None:
        return next((c for c in self.controls if c.name == name), None)

    def data_key(self, image: str) -> str:
        return self.images[image]


def _value_key(value: str | None) -> str | None:
    """``$image`` -> ``image`` (the task data key of an object tag)."""
    if not value:
        return None
    value = value.strip()
    return value[1:] if value.startswith("$") else None


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("true", "1", "yes")


def parse_label_config(text: str) -> LabelConfig:
    """Read a label config; :class:`ConfigError` when it is not XML or has no image."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("the label config is empty")
    if len(text) > _MAX_CONFIG:
        raise ConfigError("the label config is over 1 MiB")
    if re.search(r"<!(DOCTYPE|ENTITY)", text, flags=re.IGNORECASE):
        raise ConfigError("the label config must not declare a DOCTYPE or entities")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConfigError(f"the label config is not valid XML: {exc}") from None
    images: dict[str, str] = {}
    controls: list[Control] = []
    for el in root.iter():
        name = el.get("name")
        if el.tag == "Image" and name:
            key = _value_key(el.get("value"))
            if key:
                images[name] = key
        elif el.tag in RESULT_TYPES and name and el.get("toName"):
            labels, aliases = [], {}
            for lab in el.iter("Label"):
                value = lab.get("value")
                if value is None:
                    continue
                labels.append(value)
                for alias in (lab.get("predicted_values") or "").split(","):
                    if alias.strip():
                        aliases[alias.strip().lower()] = value
            controls.append(
                Control(
                    name=name,
                    tag=el.tag,
                    to_name=el.get("toName", "").split(",")[0].strip(),
                    labels=tuple(labels),
                    aliases=aliases,
                    smart=_truthy(el.get("smart")) or _truthy(el.get("smartOnly")),
                )
            )
    if not images:
        raise ConfigError(
            'the label config has no <Image name="..." value="$key"/> tag: segany segments images'
        )
    controls = [c for c in controls if c.to_name in images]
    return LabelConfig(images=images, controls=tuple(controls))
