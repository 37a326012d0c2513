"""Model variants: one small factory per variant naming only the dimensions that differ.

``MODEL_REGISTRY[name](**overrides)`` builds an untrained model; :func:`config_from_state_dict`
recovers the variant and dimensions of a checkpoint so that any SAM checkpoint, including
ViTs of custom size, builds the right model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

PROMPT_EMBED_DIM = 256
ENCODER_STRIDE = 16


def build_sam(image_encoder: torch.nn.Module, *, img_size: int = 1024) -> Sam:
    """Compose SAM around ``image_encoder`` with the standard prompt encoder and decoder."""
    grid = img_size // ENCODER_STRIDE
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
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
) -> Sam:
    """SAM with a ViT encoder of any size (the official ones below are instances)."""
    encoder = ImageEncoderViT(
        img_size=img_size,
        patch_size=ENCODER_STRIDE,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        out_chans=PROMPT_EMBED_DIM,
        qkv_bias=True,
        use_rel_pos=use_rel_pos,
        window_size=window_size,
        global_attn_indexes=tuple(global_attn_indexes),
    )
    return build_sam(encoder, img_size=img_size)


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


def vit_t(*, img_size: int = 1024, **overrides: Any) -> Sam:
    """MobileSAM: TinyViT-5M encoder distilled from ViT-H, ``mobile_sam.pt``."""
    dims: dict[str, Any] = dict(
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
    )
    encoder = TinyViT(img_size=img_size, **{**dims, **overrides})
    return build_sam(encoder, img_size=img_size)


MODEL_REGISTRY: dict[str, Callable[..., Sam]] = {
    "vit_t": vit_t,
    "vit_b": vit_b,
    "vit_l": vit_l,
    "vit_h": vit_h,
    "vit_custom": vit_custom,
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
    if f"{enc}patch_embed.seq.0.c.weight" in state_dict:
        return "vit_t", {}
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
    if window == 14 and grid * patch == 1024:
        for name, dims in VIT_DIMS.items():
            if all(overrides[k] == v for k, v in dims.items()):
                return name, {}
    return "vit_custom", overrides


def model_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Sam:
    """Build the model a state dict describes and load it with strict key checking."""
    name, overrides = config_from_state_dict(state_dict)
    model = build_model(name, **overrides)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
