"""SAM 2 video: memory modules, the tracker and its compat API, and parity with the reference
``SAM2VideoPredictor`` (``sam2==1.1.0``) on seeded random weights.

``tests/data/sam2_video_tiny_golden.npz`` is made by ``benchmarks/make_sam2_video_goldens.py``
(reference python): a reduced SAM 2.1 (image path and memory), its weights (float16-exact),
and the reference's outputs over a session on six DAVIS frames
(``tests/data/sam2_video_clip/``): a click, a box and an empty mask on frame 0 (three
objects), propagation, a correction on frame 3, a mask on frame 4, propagation forward
again and backward.

Tolerances (measured: low-res logits 7.2e-5, object scores 1.9e-3 on logits up to 10 (the
golden's score head is scaled by 100), pointers 1.5e-4; docs/video.md): low-res logits
5e-4, object scores 1e-2, pointers 1e-3, masks at video size equal wherever our logit is at
least ``MASK_MARGIN`` from 0.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from segany import compat
from segany.models.common import chunked_attention
from segany.models.memory import RoPEAttention, rotary_angles, rotate
from segany.models.registry import build_model, sam2_custom
from segany.models.sam2_video import Sam2Video
from segany.video.sam2_tracker import Sam2Tracker
from segany.video.tracker import ObjectPrompt
from segany.videos import open_video

from .conftest import TEST_DATA

GOLDEN = TEST_DATA / "sam2_video_tiny_golden.npz"
CLIP = TEST_DATA / "sam2_video_clip"
LOWRES_ATOL = 5e-4
SCORE_ATOL = 1e-2
PTR_ATOL = 1e-3
MASK_MARGIN = 1e-3


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["meta"]))


@pytest.fixture(scope="module")
def tiny_video_model(golden) -> Sam2Video:
    z, meta = golden
    model = sam2_custom(**meta["segany_config"]).eval()
    state = {k[2:]: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k[:2] == "w:"}
    model.load_state_dict(state, strict=True)
    return model


def mask_prompt(kind: str, size: tuple[int, int]) -> np.ndarray:
    """The golden's mask prompts (make_sam2_video_goldens.object_mask)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    ellipse = ((xx - 0.4 * w) / (0.2 * w)) ** 2 + ((yy - 0.55 * h) / (0.3 * h)) ** 2 <= 1.0
    return ellipse if kind == "ellipse" else np.zeros_like(ellipse)


def replay(model: Sam2Video, meta: dict, check, **options):
    """Run the golden's session through the compat predictor, calling
    ``check(key, frame, obj_ids, video_res_logits, state)`` after every output."""
    predictor = compat.SAM2VideoPredictor(model, **{**meta["predictor_options"], **options})
    state = predictor.init_state(str(CLIP))
    size = (state["video_height"], state["video_width"])
    with torch.inference_mode():
        for i, st in enumerate(meta["steps"]):
            kind = st["kind"]
            if kind in ("add_points", "add_box"):
                f, ids, video = predictor.add_new_points_or_box(
                    state,
                    frame_idx=st["frame_idx"],
                    obj_id=st["obj_id"],
                    points=st.get("points"),
                    labels=st.get("labels"),
                    box=st.get("box"),
                    clear_old_points=st.get("clear_old_points", True),
                )
                check(f"s{i}", f, ids, video, state)
            elif kind == "add_mask":
                mask = mask_prompt(st["mask"], size)
                f, ids, video = predictor.add_new_mask(state, st["frame_idx"], st["obj_id"], mask)
                check(f"s{i}", f, ids, video, state)
            else:
                frames = []
                for f, ids, video in predictor.propagate_in_video(
                    state,
                    start_frame_idx=st.get("start_frame_idx"),
                    reverse=st.get("reverse", False),
                ):
                    check(f"s{i}_f{f}", f, ids, video, state)
                    frames.append(f)
                assert frames == st["frames"]
    return predictor, state


def test_session_matches_reference(golden, tiny_video_model):
    z, meta = golden
    worst = {"lowres": 0.0, "score": 0.0, "ptr": 0.0}
    seen = {"absent": 0, "present": 0, "records": 0}

    def check(key, f, ids, video, state):
        ref = np.unpackbits(z[f"{key}_video"], axis=-1, count=video.shape[-1]).astype(bool)
        logits = video[:, 0].numpy()
        assert logits.shape == ref.shape
        sure = np.abs(logits) > MASK_MARGIN
        np.testing.assert_array_equal(logits[sure] > 0, ref[sure])
        session = state.session
        for idx, oid in enumerate(ids):
            k = f"{key}_obj{oid}"
            if f"{k}_lowres" not in z.files:
                continue
            obj = session._objects[idx]
            out = obj.output(f, obj.temp_cond) or obj.output(f, obj.temp_non_cond)
            for name, ours, tol in (
                ("lowres", out.pred_masks[0, 0], LOWRES_ATOL),
                ("score", out.score, SCORE_ATOL),
                ("ptr", out.obj_ptr, PTR_ATOL),
            ):
                d = float(np.abs(ours.numpy() - z[f"{k}_{name}"]).max())
                assert d <= tol, (k, name, d)
                worst[name] = max(worst[name], d)
            seen["absent" if z[f"{k}_score"].item() < 0 else "present"] += 1
            seen["records"] += 1

    replay(tiny_video_model, meta, check)
    # the session covers both sides of the occlusion rule and every recorded output
    assert seen["absent"] >= 3 and seen["present"] >= 30
    assert seen["records"] == sum(1 for k in z.files if k.endswith("_lowres"))


def test_dropped_memories_are_recomputed_exactly(golden, tiny_video_model):
    """memory_window=0 drops every predicted frame's memory as soon as the next frame is
    tracked; the memories recomputed on demand give the same outputs."""
    z, meta = golden
    step = next(i for i, s in enumerate(meta["steps"]) if s["kind"] == "propagate")
    meta = {**meta, "steps": meta["steps"][: step + 1]}
    outs: dict[int, list] = {0: [], 1: []}

    def collect(window):
        def check(key, f, ids, video, state):
            outs[window].append(video.clone())

        return check

    replay(tiny_video_model, meta, collect(0), memory_window=0)
    replay(tiny_video_model, meta, collect(1), memory_window=None)
    assert len(outs[0]) == len(outs[1]) > 3
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_tracker_gives_track_result(tiny_video_model):
    video = open_video(CLIP)
    h, w = video.size
    tracker = Sam2Tracker(tiny_video_model)
    prompts = {
        2: {
            5: ObjectPrompt(points=np.array([[0.45 * w, 0.5 * h]]), labels=np.array([1])),
            7: ObjectPrompt(mask=mask_prompt("ellipse", (h, w))),
        }
    }
    calls = []
    result = tracker.track(video, prompts, progress=calls.append)
    assert result.object_ids == [5, 7]
    assert sorted(result.masks) == list(range(len(video)))  # forward and backward
    assert sum(calls) == len(video)
    given, kept = mask_prompt("ellipse", (h, w)), result.mask(2, 7)  # through low-res logits
    assert (given & kept).sum() / (given | kept).sum() > 0.95
    assert result.scores[2][7] == pytest.approx(1 / (1 + np.exp(-10.0)))
    labels = result.label_map(4)
    assert labels.shape == (h, w) and set(np.unique(labels)) <= {0, 5, 7}


def test_rotary_encoding_is_a_rotation_by_grid_position():
    cos, sin = rotary_angles(8, (2, 3))
    assert cos.shape == (6, 4)
    # token 0 sits at the origin: no rotation; token 4 is column 1, row 1
    torch.testing.assert_close(cos[0], torch.ones(4))
    x = torch.randn(1, 1, 6, 8)
    y = rotate(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # lengths kept
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])
    # attention scores depend only on the offset between grid positions
    attn = RoPEAttention(embedding_dim=8)
    q = torch.randn(1, 6, 8)
    out = attn(q, q, q, size=(2, 3))
    assert out.shape == (1, 6, 8)
    # object-pointer keys after the grids are not rotated: appending them changes nothing
    # for the rotated part (checked through the key count accepted)
    k = torch.randn(1, 6 * 2 + 3, 8)
    assert attn(q, k, k, size=(2, 3), num_k_exclude_rope=3).shape == (1, 6, 8)


def test_official_video_model_keys_load_strictly():
    """The official layouts: every key of sam2.1_hiera_t / sam2_hiera_t is a real module
    now (no holders), and the state dict round-trips strictly."""
    for name, extra in (("sam2.1_hiera_t", True), ("sam2_hiera_t", False)):
        model = build_model(name)
        assert isinstance(model, Sam2Video)
        sd = model.state_dict()
        assert ("no_obj_embed_spatial" in sd) == extra
        assert ("obj_ptr_tpos_proj.weight" in sd) == extra
        assert sd["memory_attention.layers.3.cross_attn_image.k_proj.weight"].shape == (256, 64)
        assert sd["memory_encoder.mask_downsampler.encoder.12.weight"].shape == (256, 256, 1, 1)
        build_model(name).load_state_dict(sd, strict=True)


def test_compat_builder_and_errors(tmp_path, tiny_video_model):
    path = tmp_path / "tiny_video.pt"
    torch.save({"model": tiny_video_model.state_dict()}, path)
    with pytest.raises(RuntimeError):  # a 2.1 checkpoint in the official 2.1 tiny layout
        compat.build_sam2_video_predictor("configs/sam2.1/sam2.1_hiera_t.yaml", str(path))
    predictor = compat.SAM2VideoPredictor(tiny_video_model)
    state = predictor.init_state(str(CLIP))
    assert state["num_frames"] == 6
    with pytest.raises(RuntimeError, match="no object"):
        next(iter(predictor.propagate_in_video(state)))
    with pytest.raises(ValueError):
        predictor.add_new_points_or_box(state, 0, 1, points=[[1, 2]])  # labels missing
    predictor.add_new_points_or_box(state, 0, 1, points=[[10, 20]], labels=[1])
    predictor.reset_state(state)
    assert state["obj_ids"] == []
    image_only = sam2_custom(**{**_image_config(), "memory": None})
    with pytest.raises(TypeError, match="video memory"):
        compat.SAM2VideoPredictor(image_only)


def _image_config() -> dict:
    z = json.loads(str(np.load(GOLDEN)["meta"]))["segany_config"]
    video_only = ("mem_dim", "memory_layers", "memory_feedforward")
    return {k: v for k, v in z.items() if k not in video_only}


def test_tracker_for_picks_by_model(tiny_video_model, golden):
    from segany.predictor import Predictor
    from segany.video.sam2_tracker import tracker_for
    from segany.video.tracker import PropagationTracker

    assert isinstance(tracker_for(Predictor(tiny_video_model)), Sam2Tracker)
    image_only = sam2_custom(**{**_image_config(), "memory": None}).eval()
    assert isinstance(tracker_for(Predictor(image_only)), PropagationTracker)


def test_fill_holes_fills_small_background_components_only():
    from segany.video.sam2_tracker import fill_holes

    logits = torch.full((1, 1, 12, 12), 5.0)
    logits[0, 0, 0:3, 0:3] = -1.0  # 9 px hole at the border (a component like any other)
    logits[0, 0, 5:7, 5:7] = -2.0  # 4 px hole
    logits[0, 0, 9, 9] = -3.0  # 1 px
    out = fill_holes(logits, 4)
    assert out[0, 0, 5:7, 5:7].eq(0.1).all() and out[0, 0, 9, 9] == 0.1
    assert out[0, 0, 0:3, 0:3].eq(-1.0).all()  # 9 px > 4: kept
    assert out[0, 0, 4, 4] == 5.0
    # 8-connectivity: two diagonal pixels are one component of 2
    two = torch.full((1, 1, 5, 5), 5.0)
    two[0, 0, 1, 1] = two[0, 0, 2, 2] = -1.0
    assert fill_holes(two, 1)[0, 0, 1, 1] == -1.0 and fill_holes(two, 2)[0, 0, 1, 1] == 0.1


def test_bf16_predictor_tracks_with_its_bfloat16_encoder(monkeypatch, tiny_video_model):
    """``precision="bf16"``: the SAM 2 tracker encodes frames with the predictor's bfloat16
    encoder copy (features close to fp32's, not equal; the model itself untouched) and
    follows the object as the fp32 tracker does."""
    from segany.predictor import Predictor
    from segany.video.sam2_tracker import tracker_for

    monkeypatch.setenv("SEGANY_FORCE_BF16", "1")  # arithmetic emulated on CPUs without it
    pred = Predictor(tiny_video_model, precision="bf16")
    tracker = tracker_for(pred)
    assert tracker.encoder is pred.encoder_copy is not None
    assert next(tracker.encoder.parameters()).dtype == torch.bfloat16
    assert next(tracker.attention.parameters()).dtype == torch.bfloat16
    assert next(tiny_video_model.memory_attention.parameters()).dtype == torch.float32
    assert next(tiny_video_model.image_encoder.parameters()).dtype == torch.float32
    video = open_video(CLIP)
    h, w = video.size
    prompts = {0: {1: ObjectPrompt(mask=mask_prompt("ellipse", (h, w)))}}
    fp32 = Sam2Tracker(tiny_video_model).track(video, prompts)
    bf16 = tracker.track(video, prompts)
    with torch.inference_mode():
        a = Sam2Tracker(tiny_video_model).start(video).features(1)
        b = tracker.start(video).features(1)
    for x, y in zip((a[0], *a[2]), (b[0], *b[2])):
        err = float((x - y).norm() / x.norm())
        assert 0 < err < 0.05, err
    for f in range(len(video)):
        m32, m16 = fp32.mask(f, 1), bf16.mask(f, 1)
        assert (m32 & m16).sum() / max((m32 | m16).sum(), 1) > 0.9, f


def _plain_rope_attention(attn, q, k, v, size, n_excl):
    """The attention as written in SAM 2: project q, k, v, rotate, softmax(q k^T) v."""
    cos, sin = rotary_angles(attn.head_dim, size)
    heads = lambda x: x.unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)  # noqa: E731
    qh, kh, vh = heads(attn.q_proj(q)), heads(attn.k_proj(k)), heads(attn.v_proj(v))
    qh = rotate(qh, cos, sin)
    n_rot = kh.shape[-2] - n_excl
    rk = rotate(
        kh[:, :, :n_rot], cos.repeat(n_rot // cos.shape[0], 1), sin.repeat(n_rot // cos.shape[0], 1)
    )
    kh = torch.cat([rk, kh[:, :, n_rot:]], dim=2)
    p = torch.softmax(qh.double() @ kh.double().transpose(-2, -1) / attn.head_dim**0.5, -1)
    out = (p @ vh.double()).float().transpose(1, 2).flatten(-2)
    return attn.out_proj(out)


@pytest.mark.parametrize("heads", [1, 2])
def test_memory_cross_attention_over_raw_values_equals_the_plain_form(heads):
    # float32 runs the fused kernel on projected values; bfloat16 (the tracker's bf16 copy)
    # attends over the raw values (kv 8 channels, narrower than a head of 16) in chunked
    # matrix products and projects afterwards: both the plain form's result
    torch.manual_seed(0)
    attn = RoPEAttention(embedding_dim=16 * heads, num_heads=heads, kv_in_dim=8)
    with torch.no_grad():
        attn.v_proj.bias.normal_()  # the bias must pass through the attention
    q = torch.randn(1, 6, 16 * heads)
    k = torch.randn(1, 6 * 3 + 4, 8)  # three 2x3 memories and four pointer tokens
    v = torch.randn(1, 6 * 3 + 4, 8)
    want = _plain_rope_attention(attn, q, k, v, (2, 3), 4)
    got = attn(q, k, v, size=(2, 3), num_k_exclude_rope=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bf = copy.deepcopy(attn).to(torch.bfloat16)
    got_bf = bf(q.bfloat16(), k.bfloat16(), v.bfloat16(), size=(2, 3), num_k_exclude_rope=4)
    rel = (got_bf.float() - want).norm() / want.norm()
    assert got_bf.dtype == torch.bfloat16 and rel < 2e-2, rel


def test_chunked_attention_equals_softmax_attention_across_chunk_edges():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 37, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 5)
    want = torch.softmax(q.double() @ k.double().transpose(-2, -1) / 8**0.5, -1) @ v.double()
    for chunk in (1, 5, 37, 64):
        got = chunked_attention(q, k, v, chunk=chunk)
        assert got.shape == (1, 2, 37, 5)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
