"""Export the image encoder and the prompt encoder + mask decoder to ONNX.

Two graphs, both in the *model frame* (see :mod:`segany.transforms`, which stays the one
place for image geometry):

``encoder.onnx``
    ``image`` ``(1, 3, S, S)`` normalised, padded pixels -> ``image_embeddings``
    ``(1, 256, S/16, S/16)``.

``decoder.onnx``
    inputs ``image_embeddings`` ``(1, 256, h, w)``; ``point_coords`` ``(B, N, 2)`` float
    model-frame ``(x, y)`` pixels; ``point_labels`` ``(B, N)`` float: 1 object, 0 background,
    -1 padding, 2 / 3 the top-left / bottom-right corner of a box (a box is given as two
    points, as in Meta's export); ``mask_input`` ``(B, 1, 4h, 4w)`` low-res logits and
    ``has_mask_input`` ``(1,)`` (1 to use the mask, 0 to ignore it). ``B`` and ``N`` are
    dynamic. Outputs ``low_res_masks`` ``(B, 4, 4h, 4w)`` logits and ``iou_predictions``
    ``(B, 4)``: index 0 is the single-mask output, 1..3 the multimask outputs.
    As the released models were trained, prompts without a box must end with a padding
    point (``(0, 0)``, label -1); :class:`segany.export.runtime.OnnxBackend` adds it.

``context.onnx`` and ``prompt.onnx``
    The same decoder split at its prompt-independent part, for prompts without a mask
    input (every click but a refinement): ``context.onnx`` maps ``image_embeddings`` to
    the image tokens ``keys`` ``(1, h*w, 256)`` and the first layer's projections ``k``,
    ``v``, ``q`` ``(1, h*w, 128)``, once per image; ``prompt.onnx`` takes those plus
    ``point_coords`` / ``point_labels`` (as above) and gives the same two outputs as
    ``decoder.onnx``, without redoing the per-image work on every click.

In these SAM 1 graphs the mask decoder's upscaling (two stride-2, 2x2 transposed
convolutions) is traced as per-token matrix products
(:attr:`~segany.models.mask_decoder.MaskDecoder.upscale_as_products`, the same function),
which onnxruntime runs 4-10% faster per graph, natively and in WebAssembly
(``benchmarks/bench_ortweb_graphs.py``).

SAM 2 (:class:`~segany.models.sam2.Sam2`; :func:`graphs_of` gives ``encoder`` and
``decoder`` only), traced from the same model code:

- ``encoder.onnx``: ``image`` ``(1, 3, S, S)`` (the square input of
  :class:`~segany.transforms.SquareGeometry`) -> ``image_embeddings`` ``(1, C, S/16, S/16)``
  (with ``no_mem_embed`` added) and the projected high-resolution maps
  ``high_res_feats_0`` ``(1, C/8, S/4, S/4)`` and ``high_res_feats_1`` ``(1, C/4, S/8, S/8)``
  (:meth:`~segany.models.sam2.Sam2.embed_features`);
- ``decoder.onnx``: the SAM 1 decoder's inputs plus the two high-res maps after
  ``image_embeddings``; outputs ``low_res_masks`` ``(B, 4, 4h, 4w)`` and
  ``iou_predictions`` ``(B, 4)`` as above and ``object_score_logits`` ``(B, 1)``. The
  sparse prompts follow SAM 2's order: box corners first (labels 2, 3), then the clicks,
  then always a padding point; the choice among the four outputs (SAM 2's stability
  fallback when one mask is asked for) is made by the caller
  (:class:`segany.export.runtime.OnnxBackend`).

HQ-SAM (:class:`~segany.models.SamHQ`; ``encoder`` and ``decoder`` only):

- ``encoder.onnx``: ``image`` -> ``image_embeddings`` and the fused ``hq_features``
  ``(1, C/8, S/4, S/4)`` (:meth:`~segany.models.SamHQ.embed_features`);
- ``decoder.onnx``: the SAM 1 decoder's inputs plus ``hq_features`` after
  ``image_embeddings`` (SAM 1's prompt order); outputs SAM's ``low_res_masks``
  ``(B, 4, 4h, 4w)`` and ``iou_predictions`` ``(B, 4)`` and the HQ mask ``hq_masks``
  ``(B, 1, 4h, 4w)``; which of SAM's outputs is added to the HQ mask (or none, with
  ``hq_token_only``) is chosen by the caller
  (:func:`~segany.models.mask_decoder_hq.hq_output`).
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path
from ..models import Sam, SamHQ
from ..models.fuse import fuse_for_inference
from ..models.mask_decoder import MaskDecoder
from ..models.sam2 import Sam2
from ..models.transformer import DecoderContext

OPSET = 18
#: Bumped whenever the exported graphs change, so that cached exports are redone.
EXPORT_VERSION = 4


#: Dynamic axes shared by the graphs that take prompts: any number of prompts (batch),
#: any number of points per prompt.
_PROMPT_AXES = {
    "point_coords": {0: "batch", 1: "num_points"},
    "point_labels": {0: "batch", 1: "num_points"},
    "low_res_masks": {0: "batch"},
    "iou_predictions": {0: "batch"},
}


class EncoderGraph(nn.Module):
    """The image encoder alone."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class Sam2EncoderGraph(nn.Module):
    """SAM 2: the image -> the image embedding and the two projected high-res maps."""

    def __init__(self, sam: Sam2) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding, (feat_s0, feat_s1) = self.sam.embed_features(image)
        return embedding, feat_s0, feat_s1


class HqEncoderGraph(nn.Module):
    """HQ-SAM: the image -> the image embedding and the fused HQ features."""

    def __init__(self, sam: SamHQ) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding, (hq,) = self.sam.embed_features(image)
        return embedding, hq


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder with all prompts as tensors (no optional inputs, no
    control flow): points of any label -1..3 and a mask gated by ``has_mask_input``."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.register_buffer("dense_pe", sam.prompt_encoder.get_dense_pe().detach().clone())

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        emb = pe.pe_layer.points(coords + 0.5, pe.input_image_size)
        labels = labels.unsqueeze(-1)
        emb = emb * (labels != -1) + pe.not_a_point_embed.weight * (labels == -1)
        for i, point_embed in enumerate(pe.point_embeddings):
            emb = emb + point_embed.weight * (labels == i)
        return emb

    def dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """The dense prompt: the mask input's embedding, or ``no_mask_embed`` (gated)."""
        pe = self.prompt_encoder
        gate = has_mask_input.reshape(1, 1, 1, 1)
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return gate * pe.mask_downscaling(mask_input) + (1 - gate) * no_mask

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.dense(mask_input, has_mask_input)
        return self.mask_decoder.predict_masks(
            image_embeddings, self.dense_pe, sparse, dense, few_tokens=True
        )


class Sam2DecoderGraph(DecoderGraph):
    """SAM 2: :class:`DecoderGraph` with the high-res maps, also giving the object score."""

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.dense(mask_input, has_mask_input)
        keep: dict = {}
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings, self.dense_pe, sparse, dense, few_tokens=True, keep=keep,
            high_res_features=(high_res_feats_0, high_res_feats_1),
        )  # fmt: skip
        return masks, iou, keep["object_score_logits"]


class HqDecoderGraph(DecoderGraph):
    """HQ-SAM: :class:`DecoderGraph` with the HQ features, giving SAM's four outputs and
    the HQ mask (:meth:`~segany.models.mask_decoder_hq.MaskDecoderHQ.predict_all`)."""

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.dense(mask_input, has_mask_input)
        return self.mask_decoder.predict_all(
            image_embeddings, self.dense_pe, sparse, dense, hq_features, few_tokens=True
        )


class ContextGraph(nn.Module):
    """``image_embeddings`` -> the decoder's per-image context (see the module docstring)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx = self.sam.prepare_decoder(image_embeddings)
        return ctx.keys, ctx.k, ctx.v, ctx.q


class PromptGraph(DecoderGraph):
    """Prompt encoder + mask decoder on a per-image context (no mask input)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__(sam)
        self.size = tuple(sam.prompt_encoder.image_embedding_size)
        self.register_buffer("key_pe", self.dense_pe.flatten(2).transpose(1, 2).contiguous())

    def forward(  # type: ignore[override]
        self,
        keys: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.embed_points(point_coords, point_labels)
        ctx = DecoderContext(keys=keys, key_pe=self.key_pe, k=k, v=v, q=q, size=self.size)
        return self.mask_decoder.predict_masks(None, None, sparse, None, context=ctx)


def _prepared(sam: Sam) -> Sam:
    """A fused, float32, CPU copy of ``sam`` (the caller's model is left untouched)."""
    model = copy.deepcopy(sam).float().cpu().eval()
    fuse_for_inference(model, onednn=False)  # plain operators: oneDNN calls do not export
    for m in model.modules():  # onnxruntime (native and WebAssembly) runs these faster
        if isinstance(m, MaskDecoder) and not m.use_high_res_features:
            m.upscale_as_products = True
    # channels-last strides are a torch CPU detail; ONNX graphs are layout-free.
    return model.to(memory_format=torch.contiguous_format)


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> Path:
    with atomic_path(path, durable=False) as tmp, warnings.catch_warnings():  # a cache
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    return path


def export_encoder(sam: Sam, path: str | os.PathLike[str]) -> Path:
    """Write the image encoder of ``sam`` to ``path`` (see the module docstring)."""
    model = _prepared(sam)
    s = model.img_size
    graph, extra = EncoderGraph(model), ()
    if isinstance(model, Sam2):
        graph, extra = Sam2EncoderGraph(model), HIGH_RES
    elif isinstance(model, SamHQ):
        graph, extra = HqEncoderGraph(model), (HQ_FEATURES,)
    with torch.no_grad():
        return _export(
            graph,
            (torch.zeros(1, 3, s, s),),
            Path(path),
            input_names=["image"],
            output_names=["image_embeddings", *extra],
            dynamic_axes={},
        )


def export_decoder(sam: Sam, path: str | os.PathLike[str]) -> Path:
    """Write the prompt encoder + mask decoder of ``sam`` to ``path``."""
    model = _prepared(sam)
    pe = model.prompt_encoder
    h, w = pe.image_embedding_size
    mh, mw = pe.mask_input_size
    c = pe.embed_dim
    graph: DecoderGraph = DecoderGraph(model)
    names: tuple[str, ...] = ()
    maps: tuple[torch.Tensor, ...] = ()
    outputs = ["low_res_masks", "iou_predictions"]
    if isinstance(model, Sam2):
        graph, names, outputs = Sam2DecoderGraph(model), HIGH_RES, [*outputs, "object_score_logits"]
        maps = (torch.randn(1, c // 8, 4 * h, 4 * w), torch.randn(1, c // 4, 2 * h, 2 * w))
    elif isinstance(model, SamHQ):
        graph, names, outputs = HqDecoderGraph(model), (HQ_FEATURES,), [*outputs, "hq_masks"]
        maps = (torch.randn(1, c // 8, 4 * h, 4 * w),)
    args = (
        torch.randn(1, c, h, w),
        *maps,
        torch.randint(0, pe.input_image_size[0], (2, 3, 2)).float(),
        torch.tensor([[1.0, 0.0, -1.0], [2.0, 3.0, 1.0]]),
        torch.zeros(2, 1, mh, mw),
        torch.zeros(1),
    )
    axes = {**_PROMPT_AXES, "mask_input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with torch.no_grad():
        return _export(
            graph,
            args,
            Path(path),
            input_names=[
                "image_embeddings",
                *names,
                "point_coords",
                "point_labels",
                "mask_input",
                "has_mask_input",
            ],
            output_names=outputs,
            dynamic_axes=axes,
        )


def export_context(sam: Sam, path: str | os.PathLike[str]) -> Path:
    """Write the decoder's per-image part of ``sam`` (``context.onnx``) to ``path``."""
    _sam1_only(sam, "context.onnx")
    model = _prepared(sam)
    pe = model.prompt_encoder
    h, w = pe.image_embedding_size
    with torch.no_grad():
        return _export(
            ContextGraph(model),
            (torch.randn(1, pe.embed_dim, h, w),),
            Path(path),
            input_names=["image_embeddings"],
            output_names=["keys", "k", "v", "q"],
            dynamic_axes={},
        )


def export_prompt(sam: Sam, path: str | os.PathLike[str]) -> Path:
    """Write the decoder's per-prompt part of ``sam`` (``prompt.onnx``) to ``path``."""
    _sam1_only(sam, "prompt.onnx")
    model = _prepared(sam)
    pe = model.prompt_encoder
    h, w = pe.image_embedding_size
    with torch.no_grad():
        ctx = model.prepare_decoder(torch.randn(1, pe.embed_dim, h, w))
        args = (
            ctx.keys,
            ctx.k,
            ctx.v,
            ctx.q,
            torch.randint(0, 1024, (2, 3, 2)).float(),
            torch.tensor([[1.0, 0.0, -1.0], [2.0, 3.0, 1.0]]),
        )
        return _export(
            PromptGraph(model),
            args,
            Path(path),
            input_names=["keys", "k", "v", "q", "point_coords", "point_labels"],
            output_names=["low_res_masks", "iou_predictions"],
            dynamic_axes=_PROMPT_AXES,
        )


GRAPHS = ("encoder", "decoder", "context", "prompt")
#: SAM 2's and HQ-SAM's graphs (their decoders are not split at the per-image context)
SAM2_GRAPHS = ("encoder", "decoder")
#: the extra outputs of SAM 2's encoder graph, extra inputs of its decoder graph
HIGH_RES = ("high_res_feats_0", "high_res_feats_1")
#: HQ-SAM's: the fused HQ features
HQ_FEATURES = "hq_features"


def graphs_of(sam: Sam) -> tuple[str, ...]:
    """The graphs :func:`export_onnx` writes for ``sam``."""
    return SAM2_GRAPHS if isinstance(sam, (Sam2, SamHQ)) else GRAPHS


def _sam1_only(sam: Sam, what: str) -> None:
    if isinstance(sam, (Sam2, SamHQ)):
        raise ValueError(f"{what} is not made for SAM 2 or HQ-SAM models (their graphs: "
                         f"{SAM2_GRAPHS})")  # fmt: skip


def export_onnx(sam: Sam, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the graphs of ``sam`` (:func:`graphs_of`: ``encoder.onnx``, ``decoder.onnx``,
    and for SAM 1 and MobileSAM ``context.onnx`` and ``prompt.onnx``) into ``directory``;
    returns their paths by name."""
    d = Path(directory)
    writers = {
        "encoder": export_encoder,
        "decoder": export_decoder,
        "context": export_context,
        "prompt": export_prompt,
    }
    return {name: writers[name](sam, d / f"{name}.onnx") for name in graphs_of(sam)}


def quantize_dynamic_int8(path: str | os.PathLike[str]) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised on the fly) of an
    exported graph, written next to it as ``<name>.int8.onnx`` once. Only ``MatMul`` and
    ``Gemm`` weights are quantised (convolutions stay float). Less accurate than the float
    graph: the measured cost is in ``docs/performance.md``; never a default."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(path)
    dst = src.with_name(src.stem + ".int8.onnx")
    if not dst.is_file():
        with atomic_path(dst, durable=False) as tmp:
            quantize_dynamic(
                str(src),
                str(tmp),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
    return dst
