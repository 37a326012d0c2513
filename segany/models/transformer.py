"""Two-way transformer of the mask decoder: prompt tokens and image tokens attend to each
other in turn (token self-attention, token->image, MLP on tokens, image->token)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import BLAS_PRODUCTS, MLP, MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose inner width may be ``embedding_dim / downsample_rate``."""

    def __init__(self, *, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        #: the few-token form's products with the image tokens (see common.Products)
        self.products = BLAS_PRODUCTS

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q (B, Nq, C)``, ``k, v (B, Nk, C)`` -> ``(B, Nq, C)``."""
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention over already projected ``q, k, v`` (inner width), then ``out_proj``.

        ``k`` and ``v`` may have batch 1 while ``q`` has batch ``B``: the keys are then
        shared, and the queries of all batch items attend in one call."""
        b, nq, _ = q.shape
        if k.shape[0] == 1 and b > 1:
            q = q.reshape(1, b * nq, -1)
        elif q.shape[0] == 1 and k.shape[0] > 1:
            q = q.expand(k.shape[0], -1, -1)
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        bo, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(bo * n // nq, nq, h * d))

    # -- the same attention, re-associated for few tokens against many image tokens --------
    # With Nt prompt tokens (about 7) and Ni image tokens (4096), projecting the image tokens
    # costs Ni * C * I multiply-adds per projection. Folding the projection weights into
    # the few tokens instead costs Ni * C * heads * Nt: less than half. Same function, only
    # the order of the products changes (float rounding); used by the inference path that
    # runs with a DecoderContext.

    def _split_weight(self, linear: nn.Linear) -> torch.Tensor:
        """``(I, C)`` weight -> ``(heads, d, C)``."""
        d = self.internal_dim // self.num_heads
        return linear.weight.view(self.num_heads, d, -1)

    def attend_image(
        self, q: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor
    ) -> torch.Tensor:
        """Few queries ``q (B, Nq, C)`` (not projected) attending image tokens ``k_img``,
        ``v_img`` ``(1 or B, Ni, C)`` (not projected) -> ``(B, Nq, C)``, i.e.
        ``forward(q, k_img, v_img)`` without projecting the image tokens."""
        h = self.num_heads
        d = self.internal_dim // h
        b, nq, c = q.shape
        qh = self.q_proj(q).view(b, nq, h, d).transpose(1, 2)  # (B, h, Nq, d)
        # scores = q_h (W_k,h x + b_k,h): the bias term is constant over keys -> cancels.
        qk = (qh @ self._split_weight(self.k_proj)).reshape(b, h * nq, c)
        shared = k_img.shape[0] == 1 and v_img.shape[0] == 1
        scores = self.products.linear(qk, k_img[0]) if shared else qk @ k_img.transpose(1, 2)
        attn = scores.mul_(d**-0.5).softmax(-1)  # (B, h*Nq, Ni)
        # A (x W_v,h^T + b_v,h) = (A x) W_v,h^T + b_v,h since the rows of A sum to 1.
        ax = self.products.linear(attn, v_img[0].t()) if shared else attn @ v_img
        ax = ax.view(b, h, nq, c)
        out = ax @ self._split_weight(self.v_proj).transpose(1, 2) + self.v_proj.bias.view(h, 1, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, h * d))

    def image_attend(
        self,
        q_img: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        projected: bool = False,
        residual: torch.Tensor | None = None,
        inplace_residual: bool = False,
    ) -> torch.Tensor:
        """Image tokens ``q_img (1 or B, Ni, C)`` attending few tokens ``k, v (B, Nk, C)``
        -> ``(B, Ni, C)``, i.e. ``forward(q_img, k, v)`` without projecting the image tokens
        (``projected``: ``q_img`` is already ``q_proj(image tokens)``, width ``I``) and with
        the output projection folded into the few values; plus ``residual`` ``(1 or B,
        Ni, C)`` if given (added in the same product, no extra pass over the tokens;
        with ``inplace_residual``, outside autograd, written into ``residual`` itself)."""
        h = self.num_heads
        d = self.internal_dim // h
        b, nk, _ = k.shape
        kh = self.k_proj(k).view(b, nk, h, d).transpose(1, 2)  # (B, h, Nk, d)
        # Scores are laid out (B, h, Nk, Ni): the softmax over the few keys then runs along
        # a strided axis and vectorises over the many image tokens.
        if projected:
            qh = q_img.view(q_img.shape[0], -1, h, d).permute(0, 2, 3, 1)  # (., h, d, Ni)
            scores = kh @ qh  # (B, h, Nk, Ni)
        else:
            # (x W_q,h^T + b_q,h) k_h^T = x (k_h W_q,h)^T + b_q,h k_h^T
            kq = (kh @ self._split_weight(self.q_proj)).reshape(b, h * nk, -1)
            bias = (kh @ self.q_proj.bias.view(h, d, 1)).reshape(b, h * nk, 1)
            if b == 1 and q_img.shape[0] == 1:
                scores = self.products.linear(kq[0], q_img[0]).add_(bias[0]).unsqueeze(0)
            else:
                scores = torch.baddbmm(bias, kq, q_img.expand(b, -1, -1).transpose(1, 2))
            scores = scores.view(b, h, nk, -1)
        attn = scores.mul_(d**-0.5).softmax(2).reshape(b, h * nk, -1).transpose(1, 2)
        vh = self.v_proj(v).view(b, nk, h, d).transpose(1, 2)  # (B, h, Nk, d)
        w_out = self.out_proj.weight.view(-1, h, d).permute(1, 2, 0)  # (h, d, C)
        vo = (vh @ w_out).reshape(b, h * nk, -1)  # (B, h*Nk, C)
        if residual is None:
            return torch.baddbmm(self.out_proj.bias.view(1, 1, -1), attn, vo)
        # each head's weights sum to 1 over its Nk keys, so every row of attn sums to h:
        # attn @ (vo + bias / h) = attn @ vo + bias
        vo = vo + self.out_proj.bias / h
        if residual.shape[0] != b:
            residual = residual.expand(b, -1, -1)
        elif not torch.is_grad_enabled() and residual._base is None and inplace_residual:
            return residual.baddbmm_(attn, vo)  # the caller's tensor, no copy of it first
        return torch.baddbmm(residual, attn, vo)


@dataclass(frozen=True)
class DecoderContext:
    """The prompt-independent part of the two-way transformer for one image: image tokens
    ``keys`` (embedding plus the no-mask dense embedding), their positional encoding
    ``key_pe``, and the first layer's projections of the image tokens (``k``, ``v`` of the
    token-to-image attention, ``q`` of the image-to-token attention). All have batch 1.
    Only valid for prompts without a mask input."""

    keys: torch.Tensor
    key_pe: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    size: tuple[int, int]  # (h, w) of the token grid


class TwoWayAttentionBlock(nn.Module):
    """One layer of the two-way transformer. The first layer adds no positional encoding
    to the tokens' self-attention (``skip_first_layer_pe``). ``mlp_keys``: ``"lin"``
    (SAM 1's ``mlp.lin1`` / ``mlp.lin2``) or ``"layers"`` (SAM 2's ``mlp.layers.0/1``),
    the same ReLU MLP."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        mlp_keys: str = "lin",
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim=embedding_dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            downsample_rate=attention_downsample_rate,
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        if mlp_keys == "lin":
            self.mlp = MLPBlock(dim=embedding_dim, hidden_dim=mlp_dim, act=nn.ReLU)
        elif mlp_keys == "layers":
            self.mlp = MLP(
                in_dim=embedding_dim, hidden_dim=mlp_dim, out_dim=embedding_dim, num_layers=2
            )
        else:
            raise ValueError(f"mlp_keys must be 'lin' or 'layers', got {mlp_keys!r}")
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            downsample_rate=attention_downsample_rate,
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        context: DecoderContext | None = None,
        few_tokens: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``context`` holds this layer's image-token projections (first layer only);
        ``few_tokens`` re-associates the cross attentions so that the image tokens are never
        projected (see :meth:`Attention.attend_image`), for the inference path."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        q = queries + query_pe
        k = None if context is not None else keys + key_pe
        if context is not None:
            attn = t2i.attend(t2i.q_proj(q), context.k, context.v)
        elif few_tokens:
            attn = t2i.attend_image(q, k, keys)
        else:
            attn = t2i(q, k, keys)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        if context is not None:
            keys = i2t.image_attend(context.q, q, queries, projected=True, residual=keys)
        elif few_tokens:
            # keys is this block's own input, not read again: summed into in place
            keys = i2t.image_attend(k, q, queries, residual=keys, inplace_residual=True)
        else:
            keys = keys + i2t(k, q, queries)
        keys = self.norm4(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Args: depth (2), embedding_dim (256), num_heads (8), mlp_dim (2048), mlp_keys
    (see :class:`TwoWayAttentionBlock`)."""

    def __init__(
        self,
        *,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        mlp_keys: str = "lin",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                mlp_keys=mlp_keys,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            downsample_rate=attention_downsample_rate,
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def prepare(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> DecoderContext:
        """Precompute the prompt-independent work for ``(1, C, h, w)`` image tokens (the
        embedding plus a dense prompt embedding that every later prompt shares)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        first = self.layers[0]
        k = keys + key_pe
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        return DecoderContext(
            keys=keys,
            key_pe=key_pe,
            k=t2i.k_proj(k),
            v=t2i.v_proj(keys),
            q=i2t.q_proj(k),
            size=(int(image_embedding.shape[-2]), int(image_embedding.shape[-1])),
        )

    def forward(
        self,
        image_embedding: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        point_embedding: torch.Tensor,
        context: DecoderContext | None = None,
        few_tokens: bool | None = None,
        final_tokens: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_embedding``, ``image_pe``: ``(B, C, h, w)``; ``point_embedding``:
        ``(B, N, C)``. Returns tokens ``(B, N, C)`` and image tokens ``(B, h*w, C)``;
        with ``final_tokens`` (indices) only those tokens go through the last
        token-to-image attention (each token attends on its own there) and are returned,
        ``(B, len(final_tokens), C)``.
        With a ``context`` from :meth:`prepare` the image arguments are not used, and the
        cross attentions run in their few-token form (same function, less work); so they
        do outside autograd when the tokens are few enough for it to be less work (tokens
        x heads at most the attention's inner width: prompts with a mask input, which have
        no context); ``few_tokens`` forces that form on or off."""
        if context is None:
            keys = image_embedding.flatten(2).transpose(1, 2)
            key_pe = image_pe.flatten(2).transpose(1, 2)
        else:
            keys, key_pe = context.keys, context.key_pe
        queries = point_embedding
        if few_tokens is None:  # the few-token form when it is less work (inference only)
            t2i = self.final_attn_token_to_image
            few = point_embedding.shape[1] * t2i.num_heads <= t2i.internal_dim
            fast = context is not None or (few and not torch.is_grad_enabled())
        else:
            fast = few_tokens
        for i, layer in enumerate(self.layers):
            queries, keys = layer(
                queries, keys, point_embedding, key_pe, context if i == 0 else None, fast
            )
        if final_tokens is not None and len(final_tokens) < queries.shape[1]:
            queries = queries[:, final_tokens]
            point_embedding = point_embedding[:, final_tokens]
        q = queries + point_embedding
        k = keys + key_pe
        final = self.final_attn_token_to_image
        attn = final.attend_image(q, k, keys) if fast else final(q, k, keys)
        queries = self.norm_final_attn(queries + attn)
        return queries, keys
