"""Compute backends for :class:`segany.predictor.Predictor`.

A backend turns a normalised, padded image into an embedding and prompts (model frame)
into low-res logits and IoUs; all geometry before and after stays in
:mod:`segany.transforms`. ``TorchBackend`` runs the torch model; ``OnnxBackend`` runs the
graphs of :mod:`segany.export.onnx` with onnxruntime, using the thread count of
:mod:`segany.runtime`.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import numpy as np
import torch

from ..fingerprint import model_fingerprint
from ..models import Sam
from ..models.mask_decoder import select_stable
from ..models.mask_decoder_hq import hq_output
from ..runtime import ort_session_options
from .onnx import HQ_FEATURES

BACKENDS = ("torch", "onnx")


def default_onnx_dir(model_id: str) -> Path:
    """Where exported graphs of a model are cached: ``$SEGANY_CACHE/onnx/<model_id>-v<N>``
    (default ``~/.cache/segany/onnx/...``; ``N`` is the export format version)."""
    from .onnx import EXPORT_VERSION

    root = os.environ.get("SEGANY_CACHE") or Path.home() / ".cache" / "segany"
    return Path(root) / "onnx" / f"{model_id}-v{EXPORT_VERSION}"


class OnnxBackend:
    """onnxruntime sessions over the graphs of :mod:`segany.export.onnx`.

    Args:
        encoder, decoder: paths of ``encoder.onnx`` and ``decoder.onnx`` (or their int8
            variants).
        context, prompt: optional paths of ``context.onnx`` and ``prompt.onnx``: with
            them, prompts without a mask input reuse the per-image context (computed on
            the first such prompt for an embedding) instead of running ``decoder.onnx``.
        mask_input_size: ``(4h, 4w)`` of the low-res logits, for the empty mask input.
        dynamic_multimask: SAM 2: ``(delta, thresh)`` of the decoder's stability fallback
            (:func:`~segany.models.mask_decoder.select_stable`) when one mask is asked for.

    SAM 2 graphs (recognised by the decoder's ``high_res_feats_*`` inputs) take the
    encoder's high-res maps, get their prompts in SAM 2's order (box corners, clicks, a
    padding point always) and have no context / prompt split. HQ-SAM graphs (the
    decoder's ``hq_features`` input) take the encoder's HQ features, SAM 1's prompt order,
    and give the HQ mask beside SAM's four outputs, combined here as the model combines
    them (:func:`~segany.models.mask_decoder_hq.hq_output`).
    """

    name = "onnx"

    def __init__(
        self,
        encoder: str | os.PathLike[str],
        decoder: str | os.PathLike[str],
        *,
        context: str | os.PathLike[str] | None = None,
        prompt: str | os.PathLike[str] | None = None,
        mask_input_size: tuple[int, int] = (256, 256),
        dynamic_multimask: tuple[float, float] | None = None,
    ) -> None:
        import onnxruntime as ort

        def session(path):
            return ort.InferenceSession(
                str(path), sess_options=ort_session_options(), providers=["CPUExecutionProvider"]
            )

        if (context is None) != (prompt is None):
            raise ValueError("give both context and prompt graphs, or neither")
        self.encoder_path, self.decoder_path = Path(encoder), Path(decoder)
        self.encoder, self.decoder = session(encoder), session(decoder)
        self.context = None if context is None else session(context)
        self.prompt = None if prompt is None else session(prompt)
        self.mask_input_size = mask_input_size
        self.dynamic_multimask = dynamic_multimask
        inputs = [i.name for i in self.decoder.get_inputs()]
        self.high_res_inputs = [n for n in inputs if n.startswith("high_res_feats_")]
        self.hq = HQ_FEATURES in inputs
        if self.hq:
            self.high_res_inputs = [HQ_FEATURES]
        self._no_mask = np.zeros((1, 1, *mask_input_size), np.float32)
        # the per-image context of the last embedding decoded: (embedding, feeds)
        self._ctx: tuple[weakref.ref, dict[str, np.ndarray]] | None = None

    @classmethod
    def from_model(
        cls,
        sam: Sam,
        *,
        model_id: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        quantized: bool = False,
    ) -> OnnxBackend:
        """Export ``sam`` once (cached in ``directory``, default :func:`default_onnx_dir`)
        and open the graphs; ``quantized`` uses the int8 dynamic-quantised variants."""
        from .onnx import export_onnx, graphs_of, quantize_dynamic_int8

        if directory is None:
            if model_id is None:
                model_id = model_fingerprint(sam)
            directory = default_onnx_dir(model_id)
        d = Path(directory)
        paths = {name: d / f"{name}.onnx" for name in graphs_of(sam)}
        if not all(p.is_file() for p in paths.values()):
            paths = export_onnx(sam, d)
        if quantized:
            paths = {name: quantize_dynamic_int8(p) for name, p in paths.items()}
        md = sam.mask_decoder
        dynamic = None
        if md.dynamic_multimask_via_stability:
            dynamic = (md.dynamic_multimask_stability_delta, md.dynamic_multimask_stability_thresh)
        return cls(
            paths["encoder"],
            paths["decoder"],
            context=paths.get("context"),
            prompt=paths.get("prompt"),
            mask_input_size=sam.prompt_encoder.mask_input_size,
            dynamic_multimask=dynamic,
        )

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, 3, S, S)`` normalised, padded image -> ``(1, C, h, w)`` embedding."""
        return self.embed_features(image)[0]

    def embed_features(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The embedding and the encoder graph's other outputs (SAM 2: the high-res maps
        the decoder takes as ``high_res_features``; HQ-SAM: its HQ features; none for
        SAM 1)."""
        x = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
        emb, *high_res = self.encoder.run(None, {"image": x})
        return torch.from_numpy(emb), tuple(torch.from_numpy(t) for t in high_res)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        high_res_features: tuple[torch.Tensor, ...] | None = None,
        hq_token_only: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as :meth:`segany.models.Sam.decode` (model frame)."""
        coords, labels = [], []
        b = next((int(t.shape[0]) for t in (point_coords, boxes, mask_input) if t is not None), 1)
        box_first = bool(self.high_res_inputs) and not self.hq  # SAM 2's order
        if boxes is not None:
            corners = (boxes.float().cpu().numpy().reshape(b, 2, 2), np.array([2.0, 3.0]))
        if boxes is not None and box_first:
            coords.append(corners[0])
            labels.append(np.broadcast_to(corners[1], (b, 2)))
        if point_coords is not None:
            coords.append(point_coords.float().cpu().numpy())
            labels.append(point_labels.float().cpu().numpy())
        if boxes is not None and not box_first:
            coords.append(corners[0])
            labels.append(np.broadcast_to(corners[1], (b, 2)))
        if boxes is None or box_first:  # the padding point the released models expect
            coords.append(np.zeros((b, 1, 2), np.float32))
            labels.append(-np.ones((b, 1), np.float32))
        points = {
            "point_coords": np.ascontiguousarray(np.concatenate(coords, axis=1), np.float32),
            "point_labels": np.ascontiguousarray(np.concatenate(labels, axis=1), np.float32),
        }
        if len(high_res_features or ()) != len(self.high_res_inputs):
            raise ValueError(f"this decoder graph takes {len(self.high_res_inputs)} high-res "
                             f"feature maps, got {len(high_res_features or ())}")  # fmt: skip
        for name, t in zip(self.high_res_inputs, high_res_features or ()):
            points[name] = np.ascontiguousarray(t.detach().cpu().numpy(), np.float32)
        if mask_input is None and self.prompt is not None:
            feeds = {**self._context_feeds(image_embeddings), **points}
            low_res, iou = self.prompt.run(None, feeds)
        elif self.hq:
            outs = self._decode_full(image_embeddings, points, mask_input, b)
            low_res, iou, hq = (torch.from_numpy(t) for t in outs)

            def sam_masks(best: torch.Tensor) -> torch.Tensor:
                return low_res[torch.arange(b), best].unsqueeze(1)

            return hq_output(hq, iou, sam_masks, multimask_output, bool(hq_token_only))
        else:
            low_res, iou = self._decode_full(image_embeddings, points, mask_input, b)[:2]
        if not multimask_output and self.dynamic_multimask is not None:
            delta, thresh = self.dynamic_multimask
            return select_stable(
                torch.from_numpy(low_res), torch.from_numpy(iou), delta=delta, thresh=thresh
            )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return torch.from_numpy(low_res[:, sel]), torch.from_numpy(iou[:, sel])

    def _context_feeds(self, image_embeddings: torch.Tensor) -> dict[str, np.ndarray]:
        """``context.onnx`` outputs for this embedding, computed once per embedding."""
        if self._ctx is not None and self._ctx[0]() is image_embeddings:
            return self._ctx[1]
        emb = np.ascontiguousarray(image_embeddings.detach().cpu().numpy(), dtype=np.float32)
        names = [o.name for o in self.context.get_outputs()]
        feeds = dict(zip(names, self.context.run(None, {"image_embeddings": emb})))
        self._ctx = (weakref.ref(image_embeddings), feeds)
        return feeds

    def _decode_full(
        self,
        image_embeddings: torch.Tensor,
        points: dict[str, np.ndarray],
        mask_input: torch.Tensor | None,
        b: int,
    ) -> list[np.ndarray]:
        if mask_input is None:
            masks = np.broadcast_to(self._no_mask, (b, 1, *self.mask_input_size))
            has_mask = np.zeros(1, np.float32)
        else:
            masks = mask_input.float().cpu().numpy()
            has_mask = np.ones(1, np.float32)
        feeds = {
            "image_embeddings": np.ascontiguousarray(
                image_embeddings.detach().cpu().numpy(), dtype=np.float32
            ),
            **points,
            "mask_input": np.ascontiguousarray(masks, np.float32),
            "has_mask_input": has_mask,
        }
        return self.decoder.run(None, feeds)
