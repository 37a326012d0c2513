"""Compute backends for :class:`segany.predictor.Predictor`.

A backend turns a normalised, padded image into an embedding and prompts (model frame)
into low-res logits and IoUs; all geometry before and after stays in
:mod:`segany.transforms`. ``TorchBackend`` runs the torch model; ``OnnxBackend`` runs the
graphs of :mod:`segany.export.onnx` with onnxruntime, using the thread count of
:mod:`segany.runtime`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..models import Sam
from ..runtime import ort_session_options

BACKENDS = ("torch", "onnx")


def default_onnx_dir(model_id: str) -> Path:
    """Where exported graphs of a model are cached: ``$SEGANY_CACHE/onnx/<model_id>-v<N>``
    (default ``~/.cache/segany/onnx/...``; ``N`` is the export format version)."""
    from .onnx import EXPORT_VERSION

    root = os.environ.get("SEGANY_CACHE") or Path.home() / ".cache" / "segany"
    return Path(root) / "onnx" / f"{model_id}-v{EXPORT_VERSION}"


class OnnxBackend:
    """onnxruntime sessions over ``encoder.onnx`` and ``decoder.onnx``.

    Args:
        encoder, decoder: paths of the exported graphs (any of their int8 variants too).
        mask_input_size: ``(4h, 4w)`` of the low-res logits, for the empty mask input.
    """

    name = "onnx"

    def __init__(
        self,
        encoder: str | os.PathLike[str],
        decoder: str | os.PathLike[str],
        *,
        mask_input_size: tuple[int, int] = (256, 256),
    ) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        self.encoder_path, self.decoder_path = Path(encoder), Path(decoder)
        self.encoder = ort.InferenceSession(
            str(encoder), sess_options=ort_session_options(), providers=providers
        )
        self.decoder = ort.InferenceSession(
            str(decoder), sess_options=ort_session_options(), providers=providers
        )
        self.mask_input_size = mask_input_size
        self._no_mask = np.zeros((1, 1, *mask_input_size), np.float32)

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
        from .onnx import export_decoder, export_encoder, quantize_dynamic_int8

        if directory is None:
            if model_id is None:
                h = hashlib.sha256()
                for name, t in sam.state_dict().items():
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
                model_id = h.hexdigest()[:32]
            directory = default_onnx_dir(model_id)
        d = Path(directory)
        enc, dec = d / "encoder.onnx", d / "decoder.onnx"
        if not enc.is_file():
            export_encoder(sam, enc)
        if not dec.is_file():
            export_decoder(sam, dec)
        if quantized:
            enc, dec = quantize_dynamic_int8(enc), quantize_dynamic_int8(dec)
        return cls(enc, dec, mask_input_size=sam.prompt_encoder.mask_input_size)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, 3, S, S)`` normalised, padded image -> ``(1, C, h, w)`` embedding."""
        x = np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)
        (emb,) = self.encoder.run(None, {"image": x})
        return torch.from_numpy(emb)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as :meth:`segany.models.Sam.decode` (model frame)."""
        coords, labels = [], []
        b = next((int(t.shape[0]) for t in (point_coords, boxes, mask_input) if t is not None), 1)
        if point_coords is not None:
            coords.append(point_coords.float().cpu().numpy())
            labels.append(point_labels.float().cpu().numpy())
        if boxes is not None:
            coords.append(boxes.float().cpu().numpy().reshape(b, 2, 2))
            labels.append(np.broadcast_to(np.array([2.0, 3.0], np.float32), (b, 2)))
        else:  # the padding point the released models expect when no box is given
            coords.append(np.zeros((b, 1, 2), np.float32))
            labels.append(-np.ones((b, 1), np.float32))
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
            "point_coords": np.ascontiguousarray(np.concatenate(coords, axis=1), np.float32),
            "point_labels": np.ascontiguousarray(np.concatenate(labels, axis=1), np.float32),
            "mask_input": np.ascontiguousarray(masks, np.float32),
            "has_mask_input": has_mask,
        }
        low_res, iou = self.decoder.run(None, feeds)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return torch.from_numpy(low_res[:, sel]), torch.from_numpy(iou[:, sel])
