"""Prompt encoder: points, boxes and a dense mask -> sparse and dense prompt embeddings.

Coordinates given to this module are in the *model input frame*: pixels of the resized
(longest side = ``input_image_size``) image, ``(x, y)``, before padding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random Fourier features of normalised ``(x, y)``."""

    def __init__(self, *, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats)
        )

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` coordinates in ``[0, 1]`` -> ``(..., 2 * num_pos_feats)``."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an ``(h, w)`` grid: ``(C, h, w)``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self.encode(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)

    def points(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """``(..., 2)`` pixel ``(x, y)`` in an image of ``(h, w)`` -> encodings."""
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self.encode(coords.float() * scale)


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
        embed_dim: width of the prompt embeddings (256).
        image_embedding_size: ``(h, w)`` of the image embedding grid (64, 64).
        input_image_size: ``(h, w)`` of the padded model input (1024, 1024).
        mask_in_chans: hidden channels of the mask downscaler (16).
        box_as_points: SAM 2's order of the sparse tokens: box corners first (as points
            labelled 2 and 3, the same embeddings), then the clicks, then always one
            padding point; SAM 1 puts the clicks first and pads only without a box.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
        box_as_points: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.box_as_points = box_as_points
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.pe_layer = PositionEmbeddingRandom(num_pos_feats=embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: ``(1, C, h, w)``."""
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``(B, N, 2)`` coordinates and ``(B, N)`` labels (1 positive, 0 negative,
        -1 padding) -> ``(B, N[+1], C)``. ``pad`` appends a padding point (used when no box
        is given, as the released models were trained)."""
        coords = coords + 0.5  # pixel centres
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.points(coords, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(B, 4)`` XYXY boxes -> ``(B, 2, C)`` corner embeddings."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.points(corners, self.input_image_size)
        corner_type = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return emb + corner_type

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 4h, 4w)`` mask logits -> ``(B, C, h, w)``."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse ``(B, N, C)`` and dense ``(B, C, h, w)`` embeddings.

        ``B`` is taken from whichever prompt is given (1 when none is).
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        parts = [weight.new_empty(bs, 0, self.embed_dim)]
        if self.box_as_points:
            if boxes is not None:
                parts.append(self.embed_boxes(boxes))
            if points is not None:
                parts.append(self.embed_points(points[0], points[1], pad=False))
            if points is not None or boxes is not None:
                parts.append(self.not_a_point_embed.weight.expand(bs, 1, -1))
        elif points is not None:
            parts.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None and not self.box_as_points:
            parts.append(self.embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1)
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
