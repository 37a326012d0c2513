"""Text prompts: detector adapters on tiny random transformers models (saved and loaded back
through the same folder path as real weights), the SAM hand-off on a synthetic image with
the real MobileSAM, NMS, thresholds, empty results, many classes, COCO and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import string

import numpy as np
import pytest
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # no model hub is reachable here; never try
pytest.importorskip("transformers")

from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from segany.cli import main  # noqa: E402
from segany.predictor import Predictor  # noqa: E402
from segany.text import (  # noqa: E402
    DETECTORS,
    Detections,
    DetectorWeightsError,
    GroundingDinoDetector,
    OwlDetector,
    TextSegmenter,
    class_nms,
    label_with_classes,
    load_detector,
    parse_queries,
)

WORDS = ["dog", "cat", "person", "car", "traffic", "light", "red", "box", "bright"]
MANY = [f"c{i}" for i in range(40)]


# --------------------------------------------------------------------------- tiny models


def _save_gdino(folder) -> None:
    """A tiny random Grounding DINO with a BERT tokenizer read from a small vocab.txt."""
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    vocab_dir = folder.parent / (folder.name + "-vocab")
    vocab_dir.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS, *MANY]
    (vocab_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(vocab_dir)
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64,
        ),
        d_model=32, num_queries=30, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )  # fmt: skip
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(
            size={"shortest_edge": 64, "longest_edge": 96}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def _save_owlv2(folder) -> None:
    """A tiny random OWLv2 with a CLIP tokenizer read from a small vocab.json/merges.txt."""
    from transformers import (
        CLIPTokenizerFast,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2Processor,
    )
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    vocab_dir = folder.parent / (folder.name + "-vocab")
    vocab_dir.mkdir(parents=True)
    vocab: dict[str, int] = {}
    for c in string.ascii_lowercase + string.digits + ".":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    # as in CLIP, the special tokens come last (OWL treats a query starting with id 0 as
    # padding)
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    (vocab_dir / "vocab.json").write_text(json.dumps(vocab))
    (vocab_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    tokenizer = CLIPTokenizerFast.from_pretrained(vocab_dir, model_max_length=16)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=eos,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        image_size=64, patch_size=16,
    )  # fmt: skip
    model = Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    ).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": 64, "width": 64}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detectors") / "tiny-gdino"
    _save_gdino(folder)
    return folder


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detectors") / "tiny-owlv2"
    _save_owlv2(folder)
    return folder


@pytest.fixture(scope="module")
def gdino(gdino_dir):
    return load_detector(gdino_dir)


@pytest.fixture(scope="module")
def owl(owl_dir):
    return load_detector(owl_dir)


@pytest.fixture()
def photo():
    rng = np.random.default_rng(1)
    return rng.integers(0, 255, size=(90, 150, 3), dtype=np.uint8)


def _inside(boxes, h, w):
    return (
        (boxes[:, 0] >= 0).all()
        and (boxes[:, 1] >= 0).all()
        and (boxes[:, 2] <= w).all()
        and (boxes[:, 3] <= h).all()
        and (boxes[:, 2] >= boxes[:, 0]).all()
        and (boxes[:, 3] >= boxes[:, 1]).all()
    )


# --------------------------------------------------------------------------- queries, NMS


def test_parse_queries():
    assert parse_queries("dog . person .") == ["dog", "person"]
    assert parse_queries(" Dog. dog , traffic  light") == ["Dog", "traffic light"]
    assert parse_queries(["cat", " cat ", "car"]) == ["cat", "car"]
    with pytest.raises(ValueError):
        parse_queries(" . . ")


def test_class_nms_is_per_class():
    boxes = np.array(
        [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=np.float64
    )
    det = Detections(
        boxes=boxes,
        scores=np.array([0.6, 0.9, 0.5, 0.4]),
        labels=np.array([0, 0, 1, 0]),
        phrases=["a", "a", "b", "a"],
        queries=["a", "b"],
    )
    keep = class_nms(det, 0.5).tolist()
    assert keep == [1, 2, 3]  # box 0 loses to box 1 (same class); box 2 is another class
    assert class_nms(det, 1.0).tolist() == [1, 0, 2, 3]  # off: all, by score
    assert class_nms(Detections.empty(["a"]), 0.5).tolist() == []


# --------------------------------------------------------------------------- Grounding DINO


def test_gdino_loads_from_folder_and_detects(gdino, photo):
    assert isinstance(gdino, GroundingDinoDetector)
    det = gdino.detect(photo, ["dog", "person"])
    assert len(det) > 0
    assert _inside(det.boxes, 90, 150)
    assert (det.scores > 0.3).all()
    assert set(det.labels.tolist()) <= {0, 1}
    for p in det.phrases:
        assert p and set(p.split()) <= {"dog", "person"}


def test_gdino_matches_transformers_postprocessing(gdino, photo):
    """Same boxes and scores as transformers' own Grounding DINO post-processing."""
    proc, model = gdino.processor, gdino.model
    inputs = proc(images=Image.fromarray(photo), text="dog . person .", return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs)
    ref = proc.post_process_grounded_object_detection(
        out, inputs.input_ids, threshold=0.3, text_threshold=0.25, target_sizes=[(90, 150)]
    )[0]
    det = gdino.detect(photo, ["dog", "person"], box_threshold=0.3, text_threshold=0.25)
    ref_boxes = ref["boxes"].numpy()
    ref_boxes[:, [0, 2]] = ref_boxes[:, [0, 2]].clip(0, 150)
    ref_boxes[:, [1, 3]] = ref_boxes[:, [1, 3]].clip(0, 90)
    o1, o2 = np.argsort(-det.scores, kind="stable"), np.argsort(-ref["scores"].numpy())
    np.testing.assert_allclose(det.scores[o1], ref["scores"].numpy()[o2], atol=1e-5)
    np.testing.assert_allclose(det.boxes[o1], ref_boxes[o2], atol=1e-3)


def test_gdino_thresholds(gdino, photo):
    q = ["dog", "person"]
    counts = [len(gdino.detect(photo, q, box_threshold=t)) for t in (0.0, 0.3, 0.6, 0.9)]
    assert counts == sorted(counts, reverse=True) and counts[0] == 30  # every query at 0
    for t in (0.3, 0.9):
        assert (gdino.detect(photo, q, box_threshold=t).scores > t).all()
    assert len(gdino.detect(photo, q, box_threshold=1.0)) == 0
    # text threshold 0: every word of the prompt is in every phrase (Grounded-SAM's rule)
    det = gdino.detect(photo, q, text_threshold=0.0)
    assert all(p == "dog person" for p in det.phrases)
    # text threshold 1: no word passes, the phrase falls back to the box's class
    det = gdino.detect(photo, q, text_threshold=1.0)
    assert det.phrases == [q[i] for i in det.labels]
    with pytest.raises(Exception, match="threshold"):
        gdino.detect(photo, q, box_threshold=1.5)


def test_gdino_many_classes_split_into_captions(gdino, photo):
    chunks = gdino.caption_chunks(MANY)
    assert len(chunks) > 1 and sorted(i for c in chunks for i in c) == list(range(len(MANY)))
    for c in chunks:  # "[CLS] c0 . c1 . ... [SEP]" fits the model's 32 tokens
        ids = gdino.tokenizer(" . ".join(MANY[i] for i in c) + " .")["input_ids"]
        assert len(ids) <= gdino.max_text_len
    det = gdino.detect(photo, MANY, box_threshold=0.0)
    assert len(det) == 30 * len(chunks)
    assert det.labels.max() >= chunks[1][0]  # classes of later captions are found too
    assert all(p in MANY or set(p.split()) <= set(MANY) for p in det.phrases)


# --------------------------------------------------------------------------- OWLv2


def test_owlv2_loads_from_folder_and_matches_transformers(owl, photo):
    assert isinstance(owl, OwlDetector) and owl.default_text_threshold is None
    q = ["dog", "cat", "c7"]
    det = owl.detect(photo, q, box_threshold=0.0)
    assert len(det) == 16  # one box per 16x16 patch of the 64x64 input
    assert det.phrases == [q[i] for i in det.labels]
    inputs = owl.processor(text=[q], images=Image.fromarray(photo), return_tensors="pt")
    with torch.inference_mode():
        out = owl.model(**inputs)
    ref = owl.processor.post_process_grounded_object_detection(
        out, threshold=0.0, target_sizes=[(90, 150)]
    )[0]
    ref_boxes = ref["boxes"].numpy()
    ref_boxes[:, [0, 2]] = ref_boxes[:, [0, 2]].clip(0, 150)
    ref_boxes[:, [1, 3]] = ref_boxes[:, [1, 3]].clip(0, 90)
    np.testing.assert_allclose(det.scores, ref["scores"].numpy(), atol=1e-5)
    np.testing.assert_allclose(det.boxes, ref_boxes, atol=1e-3)
    np.testing.assert_array_equal(det.labels, ref["labels"].numpy())
    high = float(np.median(det.scores))
    assert (owl.detect(photo, q, box_threshold=high).scores > high).all()


# --------------------------------------------------------------------------- loading


def test_named_detector_is_found_in_the_cache_folder(gdino_dir, photo, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))
    shutil.copytree(gdino_dir, tmp_path / "detectors" / "grounding-dino-tiny")
    det = load_detector("IDEA-Research/grounding-dino-tiny")  # hub id or short name
    assert isinstance(det, GroundingDinoDetector) and det.name == "grounding-dino-tiny"
    assert len(det.detect(photo, ["dog"])) > 0


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))
    with pytest.raises(DetectorWeightsError) as info:
        load_detector("owlv2")
    msg = str(info.value)
    spec = DETECTORS["owlv2"]
    assert spec.hub_id in msg and "model.safetensors" in msg and "config.json" in msg
    assert str(tmp_path / "detectors" / "owlv2") in msg and "hf download" in msg
    with pytest.raises(DetectorWeightsError, match="no such folder"):
        load_detector(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetectorWeightsError, match="config.json"):
        load_detector(tmp_path / "empty")


# --------------------------------------------------------------------------- SAM hand-off


class StubDetector:
    """Known boxes, same interface as the real adapters."""

    name = "stub"
    default_box_threshold = 0.3
    default_text_threshold = 0.25

    def __init__(self, boxes, scores, labels, phrases):
        self.det = (np.asarray(boxes, float), np.asarray(scores, float), labels, phrases)
        self.calls = []

    def detect(self, image, queries, *, box_threshold=None, text_threshold=None):
        self.calls.append((image.shape, list(queries), box_threshold, text_threshold))
        boxes, scores, labels, phrases = self.det
        keep = scores > (self.default_box_threshold if box_threshold is None else box_threshold)
        idx = np.flatnonzero(keep)
        return Detections(
            boxes[idx], scores[idx], np.asarray(labels)[idx], [phrases[i] for i in idx], queries
        )


# bright rectangles on a dark, non-square image that is not 1024 px: boxes given as XYWH or
# left in the image frame (unscaled) land elsewhere in the model frame
RECTS = {"red box": (60, 50, 200, 170), "bright car": (330, 210, 560, 330)}


def _synthetic():
    img = np.full((400, 600, 3), 20, np.uint8)
    x0, y0, x1, y1 = RECTS["red box"]
    img[y0:y1, x0:x1] = (230, 40, 40)
    x0, y0, x1, y1 = RECTS["bright car"]
    img[y0:y1, x0:x1] = (240, 240, 240)
    return img


def _stub():
    pad = 6
    boxes = [[x0 - pad, y0 - pad, x1 + pad, y1 + pad] for x0, y0, x1, y1 in RECTS.values()]
    boxes.append([330, 212, 560, 331])  # a duplicate of the car: removed by NMS
    boxes.append([0, 0, 10, 10])  # below the box threshold
    return StubDetector(
        boxes, [0.9, 0.8, 0.7, 0.1], [0, 1, 1, 0], ["red box", "bright car", "car", "red"]
    )


@pytest.fixture(scope="module")
def mobile_segmenter(mobile_sam):
    return TextSegmenter(Predictor(mobile_sam), _stub())


def test_masks_lie_in_their_boxes_and_cover_the_objects(mobile_segmenter):
    img = _synthetic()
    result = mobile_segmenter.segment(img, "red box . bright car")
    assert len(result) == 2 and result.phrases == ["red box", "bright car"]
    assert result.label_names == ["red box", "bright car"]
    assert result.masks.shape == (2, 400, 600)
    for k, name in enumerate(RECTS):
        x0, y0, x1, y1 = RECTS[name]
        truth = np.zeros((400, 600), bool)
        truth[y0:y1, x0:x1] = True
        m = result.masks[k]
        bx0, by0, bx1, by1 = result.boxes[k].astype(int)
        outside = m.copy()
        outside[max(0, by0 - 2) : by1 + 2, max(0, bx0 - 2) : bx1 + 2] = False
        assert outside.sum() == 0, f"{name}: mask leaves its box"
        assert (m & truth).sum() / truth.sum() > 0.95, f"{name}: object not covered"
        assert (m & truth).sum() / (m | truth).sum() > 0.9
        assert 0.5 < result.ious[k] <= 1.5 and 0 <= result.stability[k] <= 1
    np.testing.assert_allclose(result.scores, [0.9, 0.8])


def test_records_and_coco_with_categories(mobile_segmenter, tmp_path):
    img = _synthetic()
    paths = []
    for i in range(2):
        p = tmp_path / "imgs" / f"s{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(p)
        paths.append(p)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    paths.append(tmp_path / "imgs" / "broken.png")
    coco = label_with_classes(
        paths, "red box . bright car", segmenter=mobile_segmenter, skip_unreadable=True,
        root=tmp_path,
    )  # fmt: skip
    assert coco["categories"] == [
        {"id": 1, "name": "red box", "supercategory": "object"},
        {"id": 2, "name": "bright car", "supercategory": "object"},
    ]
    assert [i["file_name"] for i in coco["images"]] == ["imgs/s0.png", "imgs/s1.png"]
    assert coco["info"]["skipped"][0]["file_name"] == "imgs/broken.png"
    anns = coco["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2, 1, 2]
    assert [a["phrase"] for a in anns] == ["red box", "bright car"] * 2
    assert anns[0]["score"] == pytest.approx(0.9) and "predicted_iou" in anns[0]
    api = COCO()
    api.dataset = json.loads(json.dumps(coco))
    api.createIndex()
    m = api.annToMask(anns[1])
    x0, y0, x1, y1 = RECTS["bright car"]
    assert m[y0:y1, x0:x1].mean() > 0.95 and m.sum() == anns[1]["area"]
    assert anns[1]["bbox"][0] == pytest.approx(x0, abs=3)
    rle = anns[0]["segmentation"]
    area = mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()})
    assert int(area) == anns[0]["area"]


# --------------------------------------------------------------------------- whole path


def test_text_to_masks_with_tiny_detector_and_tiny_sam(gdino, tiny_model, photo):
    seg = TextSegmenter(Predictor(tiny_model), gdino, max_detections=5)
    result = seg.segment(photo, "dog . person")
    assert 0 < len(result) <= 5
    assert result.masks.shape == (len(result), 90, 150) and result.masks.dtype == bool
    assert list(result.scores) == sorted(result.scores, reverse=True)
    # class-wise NMS: no two kept boxes of one class overlap above the threshold
    det = seg.detect(photo, ["dog", "person"])
    from segany.masks import box_iou

    iou = box_iou(torch.tensor(det.boxes), torch.tensor(det.boxes)).numpy()
    same = det.labels[:, None] == det.labels[None, :]
    np.fill_diagonal(same, False)
    assert (iou[same] <= seg.nms_threshold + 1e-6).all()
    recs = result.records("coco_rle")
    assert {r["label"] for r in recs} <= {"dog", "person"}
    # NMS off keeps more
    assert len(TextSegmenter(Predictor(tiny_model), gdino, nms_threshold=1.0).detect(
        photo, "dog . person")) >= len(det)  # fmt: skip


def test_empty_results(gdino, owl, tiny_model, photo):
    for det in (gdino, owl):
        seg = TextSegmenter(Predictor(tiny_model), det, box_threshold=1.0)
        result = seg.segment(photo, "dog")
        assert len(result) == 0 and result.masks.shape == (0, 90, 150)
        assert result.records() == [] and result.summary() == []
        coco = label_with_classes([photo], "dog . cat", segmenter=seg)
        assert len(coco["images"]) == 1 and coco["annotations"] == []
        assert [c["name"] for c in coco["categories"]] == ["dog", "cat"]


def test_owlv2_whole_path(owl, tiny_model, photo):
    seg = TextSegmenter(Predictor(tiny_model), owl, box_threshold=0.0, nms_threshold=0.3)
    result = seg.segment(photo, ["dog", "cat"])
    assert len(result) > 0 and set(result.phrases) <= {"dog", "cat"}
    assert result.masks.shape[1:] == (90, 150)


# --------------------------------------------------------------------------- CLI


def test_cli_segment_text(gdino_dir, tmp_path, capsys, mobile_sam):
    img = tmp_path / "synthetic.png"
    Image.fromarray(_synthetic()).save(img)
    out = tmp_path / "out" / "m.png"
    code = main(
        ["segment", str(img), "--text", "dog . person", "--detector", str(gdino_dir),
         "--box-threshold", "0.5", "--out", str(out), "--overlay", str(tmp_path / "o.png"),
         "--coco", str(tmp_path / "c.json"), "--all-masks"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == ["dog", "person"] and len(summary["masks"]) > 0
    union = np.asarray(Image.open(out)) > 0
    each = [np.asarray(Image.open(r["file"])) > 0 for r in summary["masks"]]
    np.testing.assert_array_equal(union, np.any(each, axis=0))
    for r, m in zip(summary["masks"], each):
        assert r["score"] > 0.5 and r["area"] == m.sum() and r["label"] in ("dog", "person")
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (400, 600, 3)
    coco = json.loads((tmp_path / "c.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["dog", "person"]
    assert len(coco["annotations"]) == len(summary["masks"])


def test_cli_text_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SEGANY_CACHE", str(tmp_path))
    img = tmp_path / "i.png"
    Image.fromarray(_synthetic()).save(img)
    base = ["segment", str(img), "--out", str(tmp_path / "m.png")]
    assert main([*base, "--text", "dog", "--point", "5,5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--text", "dog", "--detector", "grounding-dino-base"]) == 2
    err = capsys.readouterr().err
    assert "IDEA-Research/grounding-dino-base" in err and "hf download" in err
