"""The simulated interaction of a training step, a part of :class:`~.trainer.Trainer`: batches of
masks, SAM's rounds of prompts with the losses (:mod:`.prompts`, :mod:`.losses`), supervised
rehearsal and replay (distillation towards the starting decoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import family as FAM
from . import prompts as P
from .data import TrainImage, lowres_targets
from .runfiles import StepStats


@dataclass
class Batch:
    """``B`` masks from a few images, ready for the simulation (model frame, low-res)."""

    embeddings: torch.Tensor | None  # (n_images, C, h, w); None in full mode
    images: list[TrainImage]
    image_index: np.ndarray  # (B,) into images / embeddings
    input_size: np.ndarray  # (B, 2) (h, w)
    targets: torch.Tensor  # (B, G, G) bool
    valid: torch.Tensor  # (B, G, G) bool
    first_is_box: np.ndarray  # (B,) bool
    first_points: np.ndarray  # (B, 2) model frame
    boxes: np.ndarray  # (B, 4) model frame, jittered
    high_res: tuple[torch.Tensor, ...] = ()  # SAM 2: (n_images, ...) each; full mode: ()

    def __len__(self) -> int:
        return len(self.image_index)


class SimulationMixin:
    """Batches and the simulation of :class:`~.trainer.Trainer` (its state is set up there)."""

    # -- batches -----------------------------------------------------------------------------
    def sample_batch(
        self, rng: np.random.Generator, images: Sequence[TrainImage] | None = None
    ) -> Batch | None:
        """Pick ``images_per_step`` images and up to ``masks_per_image`` masks of each, and
        draw their first prompts. ``None`` if every picked mask vanished at low res."""
        cfg = self.cfg
        pool = self.train_images if images is None else images
        n_img = min(cfg.images_per_step, len(pool))
        picked = [pool[i] for i in rng.choice(len(pool), size=n_img, replace=False)]
        img_list: list[TrainImage] = []
        index, sizes, targets, valids, is_box, points, boxes = [], [], [], [], [], [], []
        s = self.model.img_size
        for im in picked:
            k = min(cfg.masks_per_image, im.num_masks)
            sel = np.sort(rng.choice(im.num_masks, size=k, replace=False))
            masks = im.masks(sel)
            input_size = self.geometry.input_size(im.height, im.width)
            tgt, valid = lowres_targets(masks, input_size, s, self.grid)
            keep = tgt.reshape(len(tgt), -1).any(axis=1)
            if not keep.any():
                continue
            sel, masks, tgt = sel[keep], masks[keep], tgt[keep]
            j = len(img_list)
            img_list.append(im)
            n = len(sel)
            first_box = P.choose_first_prompts(n, rng, cfg.box_prob)
            pts = self.geometry.coords_to_model(P.sample_points(masks, rng), (im.height, im.width))
            bxs = self.geometry.boxes_to_model(im.boxes_xyxy(sel), (im.height, im.width)).numpy()
            bxs = P.jitter_boxes(bxs, rng, cfg.box_noise, cfg.box_max_shift)
            index += [j] * n
            sizes += [input_size] * n
            targets.append(tgt)
            valids.append(np.broadcast_to(valid, tgt.shape))
            is_box.append(first_box)
            points.append(pts.numpy())
            boxes.append(bxs)
        if not img_list:
            return None
        emb, high_res = None, ()
        if self.embeddings is not None:
            items = [self.embeddings.get(im) for im in img_list]
            emb = torch.cat([it.embedding for it in items]).to(self.device)
            maps = zip(*(it.high_res for it in items))
            high_res = tuple(torch.cat(t).to(self.device) for t in maps)
        return Batch(
            embeddings=emb,
            images=img_list,
            image_index=np.asarray(index, dtype=np.int64),
            input_size=np.asarray(sizes, dtype=np.int64),
            targets=torch.from_numpy(np.concatenate(targets)).to(self.device),
            valid=torch.from_numpy(np.concatenate(valids)).to(self.device),
            first_is_box=np.concatenate(is_box),
            first_points=np.concatenate(points),
            boxes=np.concatenate(boxes),
            high_res=high_res,
        )

    def _embed_full(
        self, images: list[TrainImage]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Full mode: the images of the batch through the encoder, with gradients."""
        xs = [FAM.model_input(self.model, im.load())[0] for im in images]
        return FAM.features(self.model, torch.cat(xs).to(self.device))

    # -- the simulation ----------------------------------------------------------------------
    def simulate(
        self, batch: Batch, rng: np.random.Generator, *, train: bool, scale: float = 1.0
    ) -> StepStats:
        """Run the rounds of interaction on ``batch``; with ``train``, back-propagate each
        round's loss (times ``scale``) as soon as it is computed (previous logits are
        detached, so rounds are independent graphs, except the shared encoder in full mode).
        """
        cfg = self.cfg
        b = len(batch)
        schedule = P.round_schedule(rng, cfg.point_rounds, cfg.empty_rounds)
        rounds = 1 + len(schedule)
        with torch.set_grad_enabled(train):
            if batch.embeddings is None:
                emb_all, hr_all = self._embed_full(batch.images)
            else:
                emb_all, hr_all = batch.embeddings, batch.high_res
            hr_all = FAM.decoder_features(self.model.mask_decoder, emb_all, hr_all)
        # rounds share this graph when the features learn (full mode; HQ-SAM's fusion)
        shared = any(t.requires_grad for t in (emb_all, *hr_all))
        idx = torch.from_numpy(batch.image_index).to(self.device)
        groups = [np.flatnonzero(~batch.first_is_box), np.flatnonzero(batch.first_is_box)]
        groups = [g for g in groups if len(g)]
        # every mask's points so far (box-first masks ignore column 0, their unused point)
        coords = batch.first_points[:, None].astype(np.float64)
        labels = np.ones((b, 1), dtype=np.int64)
        logits_prev: torch.Tensor | None = None
        valid_np = batch.valid.cpu().numpy()
        target_np = batch.targets.cpu().numpy()
        stats = StepStats(masks=b)
        n_backward = rounds * len(groups)
        done = 0
        for r in range(rounds):
            if r > 0 and schedule[r - 1]:
                assert logits_prev is not None
                pred = (logits_prev[:, 0] > 0).cpu().numpy()
                cells, lab = P.sample_error_points(target_np, pred, rng, valid_np)
                pts = P.lowres_to_model_points(cells, rng, self.stride, batch.input_size)
                coords = np.concatenate([coords, pts[:, None]], axis=1)
                labels = np.concatenate([labels, lab[:, None]], axis=1)
            new_logits = torch.zeros(b, 1, self.grid, self.grid, device=self.device)
            round_iou = torch.zeros(b, device=self.device)
            for g in groups:
                is_box_group = bool(batch.first_is_box[g[0]])
                gt = torch.from_numpy(g).to(self.device)
                kwargs: dict[str, Any] = {}
                n_pts = coords.shape[1] - (1 if is_box_group else 0)
                if n_pts > 0:
                    sl = slice(1, None) if is_box_group else slice(None)
                    kwargs["point_coords"] = (
                        torch.from_numpy(coords[g][:, sl]).float().to(self.device)
                    )
                    kwargs["point_labels"] = torch.from_numpy(labels[g][:, sl]).to(self.device)
                if is_box_group:
                    kwargs["boxes"] = torch.from_numpy(batch.boxes[g]).float().to(self.device)
                if logits_prev is not None:
                    kwargs["mask_input"] = logits_prev[gt]
                multimask = r == 0 and (not is_box_group or cfg.box_multimask)
                with torch.set_grad_enabled(train):
                    rows_g = idx[gt]
                    logits, iou, out = FAM.decode_loss(
                        self.model, emb_all[rows_g], tuple(t[rows_g] for t in hr_all),
                        batch.targets[gt], batch.valid[gt], cfg, multimask=multimask, **kwargs,
                    )  # fmt: skip
                done += 1
                share = len(g) / b / rounds
                if train:
                    last = done == n_backward
                    (out.loss * share * scale).backward(retain_graph=shared and not last)
                stats.loss += float(out.loss.detach()) * share
                stats.focal += float(out.focal) * share
                stats.dice += float(out.dice) * share
                stats.iou_mse += float(out.iou_mse) * share
                stats.object += float(out.object) * share
                pick = iou.detach().argmax(dim=1)  # the paper feeds the best-scored mask back
                rows = torch.arange(len(g), device=self.device)
                new_logits[gt, 0] = logits.detach()[rows, pick]
                round_iou[gt] = out.true_iou[rows, pick]
            logits_prev = new_logits
            if r == 0:
                stats.iou_first = float(round_iou.mean())
            stats.iou_last = float(round_iou.mean())
        return stats

    # -- rehearsal ---------------------------------------------------------------------------
    def rehearse_step(self, rng: np.random.Generator, *, scale: float = 1.0) -> float:
        """One batch of the labelled rehearsal images through :meth:`simulate`, its loss
        back-propagated times ``rehearse_weight * scale``; returns that batch's loss."""
        batch = None
        while batch is None:
            batch = self.sample_batch(rng, self.rehearse_images)
        st = self.simulate(batch, rng, train=True, scale=self.cfg.rehearse_weight * scale)
        return st.loss

    # -- replay ------------------------------------------------------------------------------
    def _freeze_teacher(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Frozen copies of the starting prompt encoder and mask decoder."""
        import copy

        pe = copy.deepcopy(self.model.prompt_encoder).eval()
        md = copy.deepcopy(self.model.mask_decoder)  # in the student's mode
        for p in [*pe.parameters(), *md.parameters()]:
            p.requires_grad_(False)
        return pe, md

    def _teacher_decode(
        self, emb: torch.Tensor, hr: tuple[torch.Tensor, ...], multimask: bool, **prompts: Any
    ) -> Any:
        assert self.teacher is not None
        pe, md = self.teacher
        points = None
        if prompts.get("point_coords") is not None:
            points = (prompts["point_coords"], prompts["point_labels"])
        sparse, dense = pe(points, prompts.get("boxes"), None)
        hr = FAM.decoder_features(md, emb, hr)
        return md(emb, pe.get_dense_pe(), sparse, dense, multimask, high_res_features=hr or None)

    def replay_loss(self, rng: np.random.Generator, *, train: bool, scale: float = 1.0) -> float:
        """Self-distillation on one replay image (no labels): the frozen starting decoder
        answers twice as many random points as ``replay_points``; the confident answers
        (best predicted IoU >= 0.8) give *object centres* (the point of the best mask
        farthest from its boundary, like the evaluation's first click), topped up with
        random points. On those points (three outputs) and on the boxes of their best masks
        (single output), the trained decoder's logits and IoUs are pulled towards the
        starting decoder's: ``focal_weight`` x per-pixel Bernoulli KL + ``replay_iou_weight``
        x IoU MSE + ``replay_rank_weight`` x :func:`rank_loss` (three outputs), times
        ``replay_weight``. Back-propagated with ``train``; returns the
        loss."""
        cfg = self.cfg
        assert self.embeddings is not None
        im = self.replay_images[int(rng.integers(len(self.replay_images)))]
        item = self.embeddings.get(im)
        emb = item.embedding.to(self.device)
        hr = tuple(t.to(self.device) for t in item.high_res)
        h, w = item.input_size
        n = cfg.replay_points
        valid = torch.zeros(self.grid, self.grid, dtype=torch.bool, device=self.device)
        valid[: -(-h // self.stride), : -(-w // self.stride)] = True
        labels = torch.ones(n, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            cand = np.stack([rng.integers(w, size=2 * n), rng.integers(h, size=2 * n)], axis=1)
            c_coords = torch.from_numpy(cand[:, None].astype(np.float32)).to(self.device)
            c_logits, c_iou = self._teacher_decode(
                emb, hr, True, point_coords=c_coords, point_labels=labels.repeat(2, 1)
            )
            score, pick = c_iou.max(dim=1)
            c_best = (c_logits[torch.arange(2 * n), pick] > 0) & valid
            pts = _object_centres(c_best.cpu().numpy(), score.cpu().numpy(), self.stride, n)
            pts = np.concatenate([pts, cand[: n - len(pts)]])
            coords = torch.from_numpy(pts[:, None].astype(np.float32)).to(self.device)
            t_logits, t_iou = self._teacher_decode(
                emb, hr, True, point_coords=coords, point_labels=labels
            )
            best = t_logits[torch.arange(n), t_iou.argmax(dim=1)] > 0
            boxes = _lowres_boxes(best & valid, self.stride, (h, w))
            t_box_logits, t_box_iou = self._teacher_decode(emb, hr, False, boxes=boxes)
        total = 0.0
        runs = [
            ({"point_coords": coords, "point_labels": labels}, True, t_logits, t_iou),
            ({"boxes": boxes}, False, t_box_logits, t_box_iou),
        ]
        for prompts, multimask, t_l, t_i in runs:
            with torch.set_grad_enabled(train):
                s_l, s_i = self.model.decode(
                    emb, multimask_output=multimask, **prompts,
                    high_res_features=FAM.decoder_features(self.model.mask_decoder, emb, hr),
                )  # fmt: skip
                p_t = torch.sigmoid(t_l)
                kl = F.binary_cross_entropy_with_logits(s_l, p_t, reduction="none")
                kl = kl - F.binary_cross_entropy_with_logits(t_l, p_t, reduction="none")
                kl = (kl * valid).sum(dim=(-1, -2)) / valid.sum()
                # the IoU term keeps the ranking of the three outputs (the one "auto"
                # picks), which drifts before the masks do
                loss = cfg.focal_weight * kl.mean()
                loss = loss + cfg.replay_iou_weight * ((s_i - t_i) ** 2).mean()
                if multimask and cfg.replay_rank_weight > 0:
                    loss = loss + cfg.replay_rank_weight * rank_loss(s_i, t_i)
                loss = cfg.replay_weight * loss / len(runs)
            if train:
                (loss * scale).backward()
            total += float(loss.detach())
        return total


def rank_loss(
    student: torch.Tensor, teacher: torch.Tensor, t_teacher: float = 0.01, t_student: float = 0.02
) -> torch.Tensor:
    """Keeps *which* output ranks first (the "auto" mask), even where the teacher's predicted
    IoUs ``(B, K)`` are nearly tied: cross-entropy from the nearly one-hot softmax of the
    teacher's IoUs (temperature ``t_teacher``) to the student's (``t_student``), minus its
    value at the teacher's own IoUs (so it is 0 when the student equals the teacher)."""
    target = torch.softmax(teacher / t_teacher, dim=1)
    ce = -(target * torch.log_softmax(student / t_student, dim=1)).sum(dim=1)
    ref = -(target * torch.log_softmax(teacher / t_student, dim=1)).sum(dim=1)
    return (ce - ref).mean()


def _object_centres(
    masks: np.ndarray, scores: np.ndarray, stride: int, n: int, min_score: float = 0.8
) -> np.ndarray:
    """Model-frame points ``(k, 2)``, ``k <= n``: for the low-res masks ``(B, G, G)`` scored
    at least ``min_score`` (best first, one per distinct centre), the cell farthest from the
    mask's boundary, at its centre pixel."""
    from ..eval.clicks import farthest_point

    out: list[tuple[int, int]] = []
    for i in np.argsort(-scores, kind="stable"):
        if len(out) >= n or scores[i] < min_score:
            break
        found = farthest_point(masks[i])
        if found is None:
            continue
        x, y = found[0] * stride + stride // 2, found[1] * stride + stride // 2
        if (x, y) not in out:
            out.append((x, y))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def _lowres_boxes(masks: torch.Tensor, stride: int, input_size: tuple[int, int]) -> torch.Tensor:
    """XYXY model-frame boxes ``(B, 4)`` around low-res masks ``(B, G, G)`` (cell edges);
    an empty mask gets the whole image."""
    h, w = input_size
    out = torch.tensor([[0.0, 0.0, float(w), float(h)]]).repeat(len(masks), 1)
    for i, m in enumerate(masks.cpu()):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs):
            x0, y0 = int(xs.min()) * stride, int(ys.min()) * stride
            x1, y1 = (int(xs.max()) + 1) * stride, (int(ys.max()) + 1) * stride
            out[i] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    out[:, [0, 2]] = out[:, [0, 2]].clamp(0, w)
    out[:, [1, 3]] = out[:, [1, 3]].clamp(0, h)
    return out.to(masks.device)
