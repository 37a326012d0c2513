"""SAM's training losses (the paper, appendix A).

The mask loss is focal + dice in a 20:1 ratio; the IoU head is trained with the mean squared
error between its prediction and the true IoU of the predicted (thresholded) mask, added with
weight 1. With multimask output each mask's loss is computed but only the lowest one is
back-propagated (the model is free to spread its three outputs over the ambiguity).

SAM 2's training (``training/loss_fns.py`` of the sam2 repository, the image case of its
fine-tuning configs: weights 20:1:1:1) is the same recipe with two changes, both options of
:func:`sam_loss`: the IoU error is absolute (L1) instead of squared, and the object-score
logit is trained with a binary cross-entropy towards "the target is not empty"; the mask
and IoU terms count only for masks whose target is not empty.

Every function takes logits ``(..., H, W)``, binary targets of the same shape and an optional
``valid`` mask (pixels outside it, e.g. the padding of the model frame, are ignored), and
returns one value per mask (the pixel dimensions reduced); :func:`sam_loss` combines them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def _weights(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(target)
    return valid.to(target.dtype).expand_as(target)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017) averaged over the (valid) pixels of each mask:
    ``-a_t (1 - p_t)^gamma log(p_t)`` with ``a_t = alpha`` on positives, ``1 - alpha`` on
    negatives (``alpha < 0``: no weighting). Returns ``(...)``."""
    target = target.to(logits.dtype)
    w = _weights(target, valid)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return (loss * w).sum(dim=(-1, -2)) / w.sum(dim=(-1, -2)).clamp_min(1.0)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with ``p`` the
    sigmoid of the logits, over the valid pixels of each mask. Returns ``(...)``."""
    target = target.to(logits.dtype)
    w = _weights(target, valid)
    p = torch.sigmoid(logits) * w
    t = target * w
    inter = (p * t).sum(dim=(-1, -2))
    return 1 - (2 * inter + smooth) / (p.sum(dim=(-1, -2)) + t.sum(dim=(-1, -2)) + smooth)


@torch.no_grad()
def mask_iou(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """IoU of the thresholded prediction (logit > 0) with the target over the valid
    pixels, per mask; 1 when both are empty. Not differentiable. Returns ``(...)``."""
    pred = logits > 0
    tgt = target > 0.5
    if valid is not None:
        v = valid.expand_as(tgt).bool()
        pred, tgt = pred & v, tgt & v
    inter = (pred & tgt).sum(dim=(-1, -2)).to(logits.dtype)
    union = (pred | tgt).sum(dim=(-1, -2)).to(logits.dtype)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_mse(pred_iou: torch.Tensor, true_iou: torch.Tensor) -> torch.Tensor:
    """Squared error between predicted and true IoU, elementwise (no reduction)."""
    return (pred_iou - true_iou.detach()) ** 2


def iou_l1(pred_iou: torch.Tensor, true_iou: torch.Tensor) -> torch.Tensor:
    """Absolute error between predicted and true IoU, elementwise (SAM 2's IoU loss)."""
    return (pred_iou - true_iou.detach()).abs()


IOU_LOSSES = {"mse": iou_mse, "l1": iou_l1}


@dataclass
class LossOutput:
    """The result of :func:`sam_loss` for ``B`` masks with ``K`` outputs each.

    ``loss`` is the scalar to back-propagate (mean over masks); ``focal``, ``dice``,
    ``iou_mse`` (the IoU term, squared or absolute error) and ``object`` (the object-score
    cross-entropy, 0 without object scores) are the means of the parts (detached);
    ``chosen`` ``(B,)`` is the output with the lowest mask loss; ``true_iou`` ``(B, K)`` the
    IoU of every output with the target.
    """

    loss: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou_mse: torch.Tensor
    chosen: torch.Tensor
    true_iou: torch.Tensor
    object: torch.Tensor


def sam_loss(
    logits: torch.Tensor,
    pred_iou: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    focal_weight: float = FOCAL_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
    iou_weight: float = IOU_WEIGHT,
    alpha: float = FOCAL_ALPHA,
    gamma: float = FOCAL_GAMMA,
    iou_all_outputs: bool = True,
    iou_loss: str = "mse",
    object_logits: torch.Tensor | None = None,
    object_weight: float = 1.0,
) -> LossOutput:
    """The SAM loss of ``K`` outputs per mask.

    Args:
        logits: ``(B, K, H, W)``; pred_iou: ``(B, K)``.
        target: ``(B, H, W)`` binary ground truth; valid: ``(B, H, W)`` or ``None``.
        iou_all_outputs: train the IoU prediction of every output (so that the highest
            predicted IoU picks the best mask at inference); ``False``: only the chosen one.
        iou_loss: ``"mse"`` (SAM) or ``"l1"`` (SAM 2) error of the predicted IoUs.
        object_logits: SAM 2's object-score logits ``(B, 1)``: adds ``object_weight`` x
            their binary cross-entropy towards "the target has a pixel (in ``valid``)", and
            the mask and IoU terms then count only for masks with a non-empty target.

    Only the output with the lowest ``focal_weight * focal + dice_weight * dice`` receives
    the mask gradient (with ``K`` = 1 that is the only output).
    """
    if logits.dim() != 4 or pred_iou.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, K, H, W) and IoUs (B, K); got {logits.shape}, "
                         f"{pred_iou.shape}")  # fmt: skip
    tgt = target[:, None].to(logits.dtype).expand_as(logits)
    v = valid[:, None].expand_as(logits) if valid is not None else None
    focal = focal_loss(logits, tgt, v, alpha=alpha, gamma=gamma)  # (B, K)
    dice = dice_loss(logits, tgt, v)
    mask_loss = focal_weight * focal + dice_weight * dice
    chosen = mask_loss.detach().argmin(dim=1)
    rows = torch.arange(len(chosen), device=logits.device)
    true_iou = mask_iou(logits.detach(), tgt, v)
    if iou_loss not in IOU_LOSSES:
        raise ValueError(f"iou_loss must be one of {sorted(IOU_LOSSES)}, got {iou_loss!r}")
    err = IOU_LOSSES[iou_loss](pred_iou, true_iou)
    iou_term = err.mean(dim=1) if iou_all_outputs else err[rows, chosen]
    total = mask_loss[rows, chosen] + iou_weight * iou_term
    obj = torch.zeros((), dtype=logits.dtype, device=logits.device)
    if object_logits is not None:
        present = (target > 0.5) if valid is None else (target > 0.5) & valid.bool()
        present = present.flatten(1).any(dim=1).to(logits.dtype)  # (B,)
        obj = F.binary_cross_entropy_with_logits(
            object_logits.reshape(-1), present, reduction="none"
        )
        total = total * present + object_weight * obj
        obj = obj.detach().mean()
    return LossOutput(
        loss=total.mean(),
        focal=focal[rows, chosen].detach().mean(),
        dice=dice[rows, chosen].detach().mean(),
        iou_mse=iou_term.detach().mean(),
        chosen=chosen,
        true_iou=true_iou,
        object=obj,
    )
