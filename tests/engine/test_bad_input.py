"""Bad input gets a clear 4xx and the server stays up: non-image files, huge images,
malformed JSON, out-of-range prompts, path traversal in every file parameter."""

from __future__ import annotations

import pytest

from segany.engine.service import BadRequest, safe_relpath

from .conftest import image_id


@pytest.fixture(params=["sqlite"])
def db_url(request, tmp_path):  # the HTTP layer is the same on every database
    return f"sqlite:///{tmp_path / 'annotations.db'}"


def post(client, url, text):
    return client.post(url, content=text, headers={"content-type": "application/json"})


def test_malformed_and_invalid_requests(client):
    iid = image_id(client, "a.png")
    url = f"/api/images/{iid}/predict"
    cases = [
        ('{"points": [[10, 20]], "labels": [1]', 400, "malformed JSON"),
        ("not json at all", 400, "malformed JSON"),
        ('{"points": [[10, 20]], "labels": [1], "evil": 1}', 422, "evil"),
        ('{"points": [[10]], "labels": [1]}', 422, "points"),
        ('{"points": "x", "labels": [1]}', 422, "points"),
        ('{"points": [[10, 20]], "labels": [1, 0]}', 422, "differ in length"),
        ('{"points": [[10, 20]], "labels": [7]}', 422, "labels must be"),
        ('{"points": [], "labels": []}', 422, "at least one point or a box"),
        ('{"points": [[1000, 20]], "labels": [1]}', 422, "outside the 144x96 image"),
        ('{"points": [[-1, 20]], "labels": [1]}', 422, "outside"),
        ('{"points": [[NaN, 20]], "labels": [1]}', 422, "NaN"),
        ('{"points": [[1e999, 20]], "labels": [1]}', 422, "NaN or infinity"),
        ('{"box": [50, 50, 10, 10]}', 422, "x0 <= x1"),
        ('{"box": [500, 500, 600, 600]}', 422, "outside"),
        ('{"points": [[10, 20]], "labels": [1], "mask_input_id": "nope"}', 404, "unknown"),
        ("[1, 2, 3]", 422, "body"),
        ('{"points": ' + str([[1, 1]] * 101) + ', "labels": ' + str([1] * 101) + "}", 422, "101"),
    ]
    for body, status, needle in cases:
        r = post(client, url, body)
        assert r.status_code == status, (body[:60], r.status_code, r.text)
        assert needle.lower() in r.json()["detail"].lower(), (body[:60], r.json())
    assert client.get("/api/health").json() == {"ok": True}


def test_mask_input_from_another_image(client):
    a, c = image_id(client, "a.png"), image_id(client, "sub/c.png")
    r = client.post(f"/api/images/{a}/predict", json={"points": [[10, 20]], "labels": [1]})
    mid = r.json()["masks"][0]["mask_input_id"]
    r = client.post(
        f"/api/images/{c}/predict", json={"points": [[10, 20]], "labels": [1], "mask_input_id": mid}
    )
    assert r.status_code == 422 and "belongs to image" in r.json()["detail"]
    r = client.post(f"/api/images/{c}/annotations", json={"mask_id": mid})
    assert r.status_code == 422


def test_non_images_and_huge_images(client):
    paths = {im["path"] for im in client.get("/api/images").json()["images"]}
    assert "notes.txt" not in paths  # not an image: never registered
    for name, needle in (("broken.jpg", "cannot be annotated"), ("huge.png", "too large")):
        iid = image_id(client, name)
        r = client.post(f"/api/images/{iid}/predict", json={"points": [[1, 1]], "labels": [1]})
        assert r.status_code == 422 and needle in r.json()["detail"], r.text
        r = client.post(f"/api/images/{iid}/prefill", json={})
        assert r.status_code == 422
        assert client.post(f"/api/images/{iid}/open").json()["image"]["status"] == "error"
    assert (
        client.post(
            "/api/images/9999/predict", json={"points": [[1, 1]], "labels": [1]}
        ).status_code
        == 404
    )
    assert client.get("/api/images/9999/file").status_code == 404
    assert client.get("/api/health").status_code == 200


def test_image_that_turns_bad_after_the_scan(client, images_dir):
    iid = image_id(client, "b.jpg")
    (images_dir / "b.jpg").write_bytes(b"garbage")
    r = client.post(f"/api/images/{iid}/predict", json={"points": [[1, 1]], "labels": [1]})
    assert r.status_code == 422 and "cannot be read" in r.json()["detail"]
    assert client.get(f"/api/images/{iid}").json()["status"] == "error"


def test_path_traversal_everywhere(client, images_dir):
    # the symlink leading out of the folder was never registered
    paths = {im["path"] for im in client.get("/api/images").json()["images"]}
    assert "escape.png" not in paths
    for url in (
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static//etc/passwd",
        "/api/images/..%2f..%2fetc%2fpasswd/file",
        "/api/images/1%2f..%2f..%2fetc/file",
    ):
        r = client.get(url)
        assert r.status_code in (400, 404, 422), (url, r.status_code)
        assert "root:" not in r.text
    coco = {
        "images": [{"id": 1, "file_name": "../../etc/passwd", "width": 5, "height": 5}],
        "annotations": [],
        "categories": [],
    }
    for name in ("../../etc/passwd", "/etc/passwd", "sub/../../x.png", "~root/x.png", "a\\..\\b"):
        coco["images"][0]["file_name"] = name
        r = client.post("/api/import/coco", json=coco)
        assert r.status_code == 400, (name, r.text)
    # an image whose database path was tampered with is refused too
    iid = image_id(client, "a.png")
    client.app.state.service.store.update_image(iid, path="../outside.png")
    assert client.get(f"/api/images/{iid}/file").status_code == 400
    assert client.get("/api/health").status_code == 200


def test_safe_relpath(tmp_path):
    root = tmp_path.resolve()
    (root / "x").mkdir()
    assert safe_relpath(root, "x/y.png") == root / "x" / "y.png"
    for bad in ("", "../y", "/etc/passwd", "x/../../y", "a\x00b", "~/y"):
        with pytest.raises(BadRequest):
            safe_relpath(root, bad)


def test_body_too_large(client, service):
    from fastapi.testclient import TestClient

    from segany.engine.server import create_app

    with TestClient(create_app(service, max_body=1000), base_url="http://localhost") as small:
        r = small.post(
            "/api/import/coco",
            content=b"{" + b" " * 2000 + b"}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        assert small.get("/api/health").status_code == 200


def test_bad_categories_and_ids(client):
    iid = image_id(client, "a.png")
    r = client.post(f"/api/images/{iid}/predict", json={"points": [[10, 20]], "labels": [1]})
    mid = r.json()["masks"][0]["mask_input_id"]
    for cat in ("", "   ", "x" * 200):
        r = client.post(f"/api/images/{iid}/annotations", json={"mask_id": mid, "category": cat})
        assert r.status_code == 422, cat
    assert client.patch("/api/annotations/424242", json={"category": "x"}).status_code == 404
    assert client.patch("/api/annotations/abc", json={"category": "x"}).status_code == 422
    assert client.get("/api/images/1/annotations?status=bogus").status_code == 400
    r = client.post(f"/api/images/{iid}/annotations", json={"mask_id": mid, "replaces": 99999})
    assert r.status_code == 404
