"""Auth and the localhost guards (issue #18, item 6): no users created with auth off, tokens
of older databases not valid with auth on, the admin token printed whenever no admin holds
a trusted one, the Host check (DNS rebinding), the Origin check (cross-site requests) and
the name rule of ``--add-user``."""

from __future__ import annotations

import re

import sqlalchemy as sa
from fastapi.testclient import TestClient

from segany.cli import main
from segany.engine.guards import served_hosts
from segany.engine.server import create_app
from segany.engine.store import Store, hash_token

from .conftest import image_id, make_service


def test_no_users_with_auth_off(client, service):
    assert service.auth is False
    r = client.post("/api/users", json={"name": "mallory", "is_admin": True})
    assert r.status_code == 403
    assert r.json()["detail"].startswith(
        "users can only be created on a server started with --auth, by an admin"
    )
    assert service.store.user_by_name("mallory") is None


def _make_v1(db: str) -> None:
    """Turn a fresh database into what segany wrote before schema 2: no
    ``users.token_trusted``, no ``annotations.replaces_id``; an admin token minted with auth
    off (the hole of issue #18)."""
    eng = sa.create_engine(Store(db).url)
    with eng.begin() as c:
        c.execute(sa.text("DROP INDEX ux_annotations_replaces_id"))
        if eng.dialect.name == "sqlite":  # no DROP COLUMN for a column in a foreign key
            q = "SELECT sql FROM sqlite_master WHERE name = 'annotations'"
            ddl = c.execute(sa.text(q)).scalar()
            ddl = "\n".join(x for x in ddl.splitlines() if "replaces_id" not in x)
            c.execute(sa.text("DROP TABLE annotations"))  # empty: a fresh database
            c.execute(sa.text(re.sub(r",\s*\n\)$", "\n)", ddl)))
        else:
            c.execute(sa.text("ALTER TABLE annotations DROP COLUMN replaces_id"))
        c.execute(sa.text("ALTER TABLE users DROP COLUMN token_trusted"))
        c.execute(sa.text("UPDATE segany_meta SET value = '1' WHERE key = 'schema_version'"))
        c.execute(
            sa.text(
                "INSERT INTO users (name, token_hash, is_admin, created_at) VALUES (:n, :h, :a, 0)"
            ),
            {"n": "mallory", "h": hash_token("planted-token"), "a": True},
        )
    eng.dispose()


def test_tokens_from_before_auth_gain_no_rights(db_url, images_dir, tiny_predictor, tmp_path):
    _make_v1(db_url)
    svc = make_service(db_url, images_dir, tiny_predictor, tmp_path / "cache", auth=True,
                       prefetch=False)  # fmt: skip
    try:
        assert svc.store.user_by_name("mallory").token_trusted is False  # migrated
        with TestClient(create_app(svc), base_url="http://localhost") as client:
            h = {"Authorization": "Bearer planted-token"}
            r = client.get("/api/me", headers=h)
            assert r.status_code == 401
            assert "issued before this server required tokens" in r.json()["detail"]
            r = client.post("/api/users", json={"name": "eve", "is_admin": True}, headers=h)
            assert r.status_code == 401
            # the operator is given an admin token, since no admin holds a trusted one
            token = svc.ensure_admin_token()
            assert token is not None and svc.ensure_admin_token() is None
            admin = {"Authorization": f"Bearer {token}"}
            assert client.get("/api/me", headers=admin).json() == {
                "id": svc.store.user_by_name("admin").id,
                "name": "admin",
                "is_admin": True,
            }
            r = client.post("/api/users", json={"name": "ann"}, headers=admin)
            assert r.status_code == 201
            ann = {"Authorization": f"Bearer {r.json()['token']}"}
            assert client.get("/api/me", headers=ann).json()["name"] == "ann"
    finally:
        svc.close()
        svc.store.close()
    # the upgrade is done once: reopening keeps the new tokens and the schema
    store = Store(db_url)
    assert store.admin_token_issued() and store.user_by_name("ann").token_trusted
    store.close()


def test_admin_token_printed_on_first_start_with_auth(service):
    assert service.ensure_admin_token() is None  # auth off: nothing to print
    service.auth = True
    first = service.ensure_admin_token()
    assert first and service.store.user_by_token(first).is_admin
    assert service.ensure_admin_token() is None  # an admin holds a trusted token now


def test_add_user_name_rule(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    db = f"sqlite:///{tmp_path / 'a.db'}"
    for bad in ("bad name!", "", "x" * 65, "a/b", "ünï"):
        assert main(["annotate", str(images), "--db", db, "--add-user", bad]) == 2, bad
        assert "invalid user name" in capsys.readouterr().err
    assert Store(db).users() == []


def test_host_check(service):
    app = create_app(service)
    for host in ("localhost", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        with TestClient(app, base_url=f"http://{host}") as c:
            assert c.get("/api/images").status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "192.168.1.5"):
        with TestClient(app, base_url=f"http://{host}") as c:
            r = c.get("/api/images")
            assert r.status_code == 421, host
            assert "does not answer to the host name" in r.json()["detail"]
            assert "--allow-host" in r.json()["detail"]
            assert c.post("/api/users", json={"name": "x"}).status_code == 421
    # a LAN name given with --allow-host, and no check at all
    lan = create_app(service, hosts=served_hosts("127.0.0.1", ["annot.lan"]))
    with TestClient(lan, base_url="http://annot.lan:8000") as c:
        assert c.get("/api/images").status_code == 200
    with TestClient(create_app(service, hosts=None), base_url="http://anything") as c:
        assert c.get("/api/images").status_code == 200


def test_served_hosts():
    local = ["127.0.0.1", "localhost", "::1"]
    assert served_hosts("127.0.0.1") == local
    assert served_hosts("10.0.0.7") == [*local, "10.0.0.7"]
    assert served_hosts("0.0.0.0") is None
    assert served_hosts("0.0.0.0", ["Box.lan:80"]) == [*local, "box.lan"]
    assert served_hosts("127.0.0.1", ["*"]) is None


def test_origin_check(client):
    iid = image_id(client, "a.png")
    url = f"/api/images/{iid}/predict"
    body = {"points": [[10, 10]], "labels": [1]}
    for origin in ("http://evil.example", "null", "http://localhost:9999", "https://localhost"):
        r = client.post(url, json=body, headers={"Origin": origin})
        assert r.status_code == 403, origin
        assert r.json()["detail"].startswith("cross-origin request refused")
        r = client.delete("/api/annotations/1", headers={"Origin": origin})
        assert r.status_code == 403
    # the annotator's own page, and clients that send no Origin
    assert client.post(url, json=body, headers={"Origin": "http://localhost"}).status_code == 200
    assert client.post(url, json=body).status_code == 200
    # the page as a reverse proxy serves it, named with --allow-host
    app = create_app(client.app.state.service, origins=["annot.example"])
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post(url, json=body, headers={"Origin": "https://annot.example"})
        assert r.status_code == 200
        r = c.post(url, json=body, headers={"Origin": "https://annot.example.evil"})
        assert r.status_code == 403
    # reads carry no risk of a change: allowed from anywhere (the Host check still applies)
    assert client.get("/api/images", headers={"Origin": "http://evil.example"}).status_code == 200


def test_serve_applies_the_host_names(service, monkeypatch):
    """`segany annotate --host H --allow-host NAME`: the app that uvicorn runs checks them."""
    import uvicorn

    from segany.engine.guards import HostOriginGuard
    from segany.engine.server import serve

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append((app, kw)))
    serve(service, host="10.0.0.7", port=8123, allow_hosts=["box.lan"])
    app, kw = apps[0]
    assert kw["host"] == "10.0.0.7" and kw["port"] == 8123
    guard = next(m for m in app.user_middleware if m.cls is HostOriginGuard)
    local = ["127.0.0.1", "localhost", "::1"]
    assert guard.kwargs == {"hosts": [*local, "box.lan", "10.0.0.7"], "origins": ["box.lan"]}
    with TestClient(app, base_url="http://box.lan:8123") as c:
        assert c.get("/api/health").status_code == 200
    with TestClient(app, base_url="http://other.lan:8123") as c:
        assert c.get("/api/health").status_code == 421
