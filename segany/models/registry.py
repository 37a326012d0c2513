"""Model variants: one small factory per variant naming only the dimensions that differ.

``MODEL_REGISTRY[name](**overrides)`` builds an untrained model; :func:`config_from_state_dict`
recovers the variant and dimensions of a checkpoint so that any SAM checkpoint, including
ViTs of custom size, builds the right model. SAM 2 / 2.1 variants carry the official
config names (``sam2.1_hiera_t``, ``sam2_hiera_b+``, ...); their numbers are those of the
official ``configs/sam2*/*.yaml`` files. HQ-SAM variants (``sam_hq_vit_b`` ...) are SAM 1's
with ``hq=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .hiera import Hiera
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .mask_decoder_hq import MaskDecoderHQ
from .memory import MemoryAttention, MemoryEncoder
from .neck import FpnNeck, HieraImageEncoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .sam2 import Sam2
from .sam2_video import Sam2Video
from .sam_hq import SamHQ
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

PROMPT_EMBED_DIM = 256
ENCODER_STRIDE = 16


def build_sam(
    image_encoder: torch.nn.Module,
    *,
    img_size: int = 1024,
    hq_vit_dim: int | None = None,
    prompt_dim: int = PROMPT_EMBED_DIM,
) -> Sam:
    """Compose SAM around ``image_encoder`` with the standard prompt encoder and decoder;
    with ``hq_vit_dim`` (the width of the encoder's early map), HQ-SAM with its decoder.
    ``prompt_dim``: width of the embedding, prompts and decoder (256; the encoder's
    output must match)."""
    grid = img_size // ENCODER_STRIDE
    decoder: dict[str, Any] = dict(
        transformer_dim=prompt_dim,
        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    if hq_vit_dim is not None:
        return SamHQ(
            image_encoder=image_encoder,
            prompt_encoder=prompt_encoder,
            mask_decoder=MaskDecoderHQ(**decoder, vit_dim=hq_vit_dim),
        )
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=MaskDecoder(**decoder),
    )


def vit_custom(
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: Sequence[int],
    window_size: int = 14,
    img_size: int = 1024,
    use_rel_pos: bool = True,
    hq: bool = False,
    prompt_dim: int = PROMPT_EMBED_DIM,
) -> Sam:
    """SAM with a ViT encoder of any size (the official ones below are instances);
    ``hq``: HQ-SAM on that encoder; ``prompt_dim``: see :func:`build_sam`."""
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=ENCODER_STRIDE,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        out_chans=prompt_dim,
        qkv_bias=True,
        use_rel_pos=use_rel_pos,
        window_size=window_size,
        global_attn_indexes=tuple(global_attn_indexes),
    )
    hq_dim = embed_dim if hq else None
    return build_sam(encoder, img_size=img_size, hq_vit_dim=hq_dim, prompt_dim=prompt_dim)


# The dimensions that differ between the released ViT encoders.
VIT_DIMS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def vit_b(**overrides: Any) -> Sam:
    """ViT-B (91M encoder parameters), ``sam_vit_b_01ec64.pth``."""
    return vit_custom(**{**VIT_DIMS["vit_b"], **overrides})


def vit_l(**overrides: Any) -> Sam:
    """ViT-L (308M), ``sam_vit_l_0b3195.pth``."""
    return vit_custom(**{**VIT_DIMS["vit_l"], **overrides})


def vit_h(**overrides: Any) -> Sam:
    """ViT-H (636M), ``sam_vit_h_4b8939.pth``."""
    return vit_custom(**{**VIT_DIMS["vit_h"], **overrides})


def vit_t(
    *, img_size: int = 1024, hq: bool = False, prompt_dim: int = PROMPT_EMBED_DIM, **overrides: Any
) -> Sam:
    """MobileSAM: TinyViT-5M encoder distilled from ViT-H, ``mobile_sam.pt``; ``hq``:
    light HQ-SAM on it; ``prompt_dim``: see :func:`build_sam`."""
    dims: dict[str, Any] = dict(
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
    )
    dims = {**dims, **overrides}
    encoder = TinyViT(img_size=img_size, out_chans=prompt_dim, **dims)
    hq_dim = dims["embed_dims"][2] if hq else None  # HQ-SAM reads stage 1's output
    return build_sam(encoder, img_size=img_size, hq_vit_dim=hq_dim, prompt_dim=prompt_dim)


# -- HQ-SAM ------------------------------------------------------------------------------


def sam_hq_vit_b(**overrides: Any) -> Sam:
    """HQ-SAM on ViT-B, ``sam_hq_vit_b.pth``."""
    return vit_custom(**{**VIT_DIMS["vit_b"], "hq": True, **overrides})


def sam_hq_vit_l(**overrides: Any) -> Sam:
    """HQ-SAM on ViT-L, ``sam_hq_vit_l.pth``."""
    return vit_custom(**{**VIT_DIMS["vit_l"], "hq": True, **overrides})


def sam_hq_vit_h(**overrides: Any) -> Sam:
    """HQ-SAM on ViT-H, ``sam_hq_vit_h.pth``."""
    return vit_custom(**{**VIT_DIMS["vit_h"], "hq": True, **overrides})


def sam_hq_vit_tiny(**overrides: Any) -> Sam:
    """Light HQ-SAM on MobileSAM's TinyViT, ``sam_hq_vit_tiny.pth``."""
    return vit_t(**{"hq": True, **overrides})


# -- SAM 2 / SAM 2.1 -------------------------------------------------------------------

# The Hiera settings that differ between the released sizes (configs/sam2*/sam2*_hiera_*.yaml;
# the 2024-07 SAM 2 and the 2024-09 SAM 2.1 files agree on them).
HIERA_DIMS: dict[str, dict[str, Any]] = {
    "t": dict(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 7, 2),
        global_att_blocks=(5, 7, 9),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "s": dict(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ),
    "b+": dict(
        embed_dim=112,
        num_heads=2,
        stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        window_pos_embed_bkg_spatial_size=(14, 14),
    ),
    "l": dict(
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_pos_embed_bkg_spatial_size=(7, 7),
        window_spec=(8, 4, 16, 8),
    ),
}


def sam2_custom(
    *,
    embed_dim: int,
    num_heads: int,
    stages: Sequence[int],
    global_att_blocks: Sequence[int],
    window_spec: Sequence[int] = (8, 4, 14, 7),
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (14, 14),
    d_model: int = 256,
    img_size: int = 1024,
    memory: str | None = None,
    mem_dim: int = 64,
    memory_layers: int = 4,
    memory_feedforward: int = 2048,
) -> Sam2:
    """SAM 2 with a Hiera trunk of any size (the official ones below are instances).

    ``d_model`` is the width of the neck, prompts and decoder (256); ``memory`` ("2" or
    "2.1") adds the video memory (:class:`~segany.models.sam2_video.Sam2Video`: memory
    attention of ``memory_layers`` layers with feed-forward width ``memory_feedforward``,
    memories ``mem_dim`` wide), as in the official checkpoints; ``None`` builds the image
    model alone.
    """
    trunk = Hiera(
        embed_dim=embed_dim,
        num_heads=num_heads,
        stages=tuple(stages),
        window_spec=tuple(window_spec),
        global_att_blocks=tuple(global_att_blocks),
        window_pos_embed_bkg_spatial_size=tuple(window_pos_embed_bkg_spatial_size),
        img_size=img_size,
    )
    neck = FpnNeck(d_model=d_model, backbone_channel_list=trunk.channel_list)
    grid = img_size // ENCODER_STRIDE
    parts = dict(
        image_encoder=HieraImageEncoder(trunk=trunk, neck=neck, scalp=1),
        prompt_encoder=PromptEncoder(
            embed_dim=d_model,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
            box_as_points=True,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=d_model,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=d_model, mlp_dim=2048, num_heads=8, mlp_keys="layers"
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            use_high_res_features=True,
            iou_prediction_use_sigmoid=True,
            pred_obj_scores=True,
            pred_obj_scores_mlp=True,
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        ),
    )
    if memory is None:
        return Sam2(**parts)
    return Sam2Video(
        **parts,
        memory_attention=MemoryAttention(
            d_model=d_model,
            mem_dim=mem_dim,
            num_layers=memory_layers,
            dim_feedforward=memory_feedforward,
        ),
        memory_encoder=MemoryEncoder(in_dim=d_model, out_dim=mem_dim),
        version=memory,
    )


def _sam2_factory(version: str, size: str) -> Callable[..., Sam2]:
    def factory(**overrides: Any) -> Sam2:
        return sam2_custom(**{**HIERA_DIMS[size], "memory": version, **overrides})

    label = {"t": "tiny", "s": "small", "b+": "base+", "l": "large"}[size]
    factory.__name__ = f"sam{version}_hiera_{size}"
    factory.__doc__ = (
        f"SAM {version} Hiera-{label} (configs/sam{version}/sam{version}_hiera_{size}.yaml)."
    )
    return factory


#: ``sam2.1_hiera_t`` ... ``sam2_hiera_l``: the official config names.
SAM2_VARIANTS: dict[str, Callable[..., Sam2]] = {
    f"sam{v}_hiera_{size}": _sam2_factory(v, size) for v in ("2.1", "2") for size in HIERA_DIMS
}


MODEL_REGISTRY: dict[str, Callable[..., Sam]] = {
    "vit_t": vit_t,
    "vit_b": vit_b,
    "vit_l": vit_l,
    "vit_h": vit_h,
    "vit_custom": vit_custom,
    **SAM2_VARIANTS,
    "sam2_custom": sam2_custom,
    "sam_hq_vit_tiny": sam_hq_vit_tiny,
    "sam_hq_vit_b": sam_hq_vit_b,
    "sam_hq_vit_l": sam_hq_vit_l,
    "sam_hq_vit_h": sam_hq_vit_h,
}


def build_model(name: str, **overrides: Any) -> Sam:
    """Build an untrained model by registry name."""
    try:
        factory = MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODEL_REGISTRY)}") from None
    return factory(**overrides)


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Infer ``(registry name, overrides)`` from a SAM state dict with the official keys.

    Raises ``ValueError`` when the keys are not those of a SAM checkpoint.
    """
    enc = "image_encoder."
    if f"{enc}trunk.patch_embed.proj.weight" in state_dict:
        return _sam2_config(state_dict), {}
    hq = "mask_decoder.hf_token.weight" in state_dict  # HQ-SAM's output token
    if f"{enc}patch_embed.seq.0.c.weight" in state_dict:
        return ("sam_hq_vit_tiny" if hq else "vit_t"), {}
    pos = state_dict.get(f"{enc}pos_embed")
    proj = state_dict.get(f"{enc}patch_embed.proj.weight")
    if pos is None or proj is None:
        raise ValueError(
            "not a SAM checkpoint: no image_encoder.patch_embed weights "
            f"(first keys: {list(state_dict)[:5]})"
        )
    grid, embed_dim = int(pos.shape[1]), int(pos.shape[-1])
    patch = int(proj.shape[-1])
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith(f"{enc}blocks."))
    rel = [state_dict.get(f"{enc}blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    if any(r is None for r in rel):
        raise ValueError("ViT checkpoints without relative positions are not supported")
    head_dim = int(rel[0].shape[1])
    global_idx = tuple(i for i, r in enumerate(rel) if int(r.shape[0]) == 2 * grid - 1)
    windowed = [int(r.shape[0]) for i, r in enumerate(rel) if i not in global_idx]
    window = (windowed[0] + 1) // 2 if windowed else 14
    overrides = dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=global_idx,
        window_size=window,
        img_size=grid * patch,
    )
    token = state_dict.get("mask_decoder.iou_token.weight")
    prompt_dim = PROMPT_EMBED_DIM if token is None else int(token.shape[1])
    if prompt_dim != PROMPT_EMBED_DIM:
        overrides["prompt_dim"] = prompt_dim
    if window == 14 and grid * patch == 1024 and prompt_dim == PROMPT_EMBED_DIM:
        for name, dims in VIT_DIMS.items():
            if all(overrides[k] == v for k, v in dims.items()):
                return (f"sam_hq_{name}" if hq else name), {}
    return "vit_custom", {**overrides, "hq": True} if hq else overrides


def _sam2_config(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The official SAM 2 / 2.1 variant whose Hiera trunk has these shapes (the head
    counts and window settings are not in a checkpoint, so only the released sizes are
    recognised)."""
    trunk = "image_encoder.trunk."
    embed_dim = int(state_dict[f"{trunk}patch_embed.proj.weight"].shape[0])
    blocks = sorted({int(k.split(".")[3]) for k in state_dict if k.startswith(f"{trunk}blocks.")})
    starts = [i for i in blocks if f"{trunk}blocks.{i}.proj.weight" in state_dict]
    bounds = [0, *starts, len(blocks)]
    stages = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    bkg = tuple(int(n) for n in state_dict[f"{trunk}pos_embed"].shape[-2:])
    version = "2.1" if "no_obj_embed_spatial" in state_dict else "2"
    for size, dims in HIERA_DIMS.items():
        if (dims["embed_dim"], dims["stages"], dims["window_pos_embed_bkg_spatial_size"]) == (
            embed_dim,
            stages,
            bkg,
        ):
            return f"sam{version}_hiera_{size}"
    raise ValueError(
        f"SAM {version} checkpoint with a Hiera trunk of width {embed_dim} and stages "
        f"{stages} is not one of the released sizes; build it with "
        "registry.sam2_custom(...) and load_state_dict"
    )


#: The key beside ``"model"`` in a checkpoint file that names the registry variant and its
#: overrides, for models whose dimensions the keys do not determine (a SAM 2 Hiera of a
#: non-released size): ``{"model": state_dict, MODEL_CONFIG_KEY: {"name": "sam2_custom",
#: "overrides": {...}}}``. Official files do not need it (the variant is read from keys).
MODEL_CONFIG_KEY = "segany_model"


def model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> Sam:
    """Build the model a state dict describes and load it with strict key checking.

    ``config`` (``{"name": registry name, "overrides": {...}}``, see
    :data:`MODEL_CONFIG_KEY`) names the variant when the keys cannot; otherwise it is read
    from the keys (:func:`config_from_state_dict`). Raises ``ValueError`` for a config
    that names no registry variant or has bad overrides.
    """
    if config is not None:
        name, overrides = _checked_config(config)
    else:
        name, overrides = config_from_state_dict(state_dict)
    model = build_model(name, **overrides)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _checked_config(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    name, overrides = config.get("name"), config.get("overrides", {})
    if name not in MODEL_REGISTRY:
        raise ValueError(f"model config names {name!r}, not one of {sorted(MODEL_REGISTRY)}")
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
        raise ValueError(f"model config overrides must be a dict of names, got {overrides!r}")
    return str(name), dict(overrides)


def custom_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The ``MODEL_CONFIG_KEY`` entry for a model built as ``build_model(name, **overrides)``
    (tuples as lists, so that ``torch.load(weights_only=True)`` reads it back)."""
    _checked_config({"name": name, "overrides": overrides})
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    return {"name": name, "overrides": plain}
