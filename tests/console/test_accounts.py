"""Accounts and who may do what, against a real console: sign-up, log-in and log-out, the cookie's flags,
CSRF, a second user guessing IDs on every route, and hostile input. No engine is needed: a host is enrolled
over HTTP as an agent would, and its channel is a plain WebSocket client speaking the frames."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yarl

from tests.services.console import PASSWORD, Client, Console


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    c = Console(tmp_path)
    try:
        yield c
    finally:
        c.stop()
        assert "Traceback" not in c.log.read_text()


@pytest.fixture
async def alice(console: Console) -> AsyncIterator[Client]:
    async with Client(console.url) as client:
        yield await client.login("alice")


@pytest.fixture
async def bob(console: Console) -> AsyncIterator[Client]:
    async with Client(console.url) as client:
        yield await client.login("bob")


async def enrolled(console: Console, user: str) -> tuple[str, str]:
    """A host of ``user`` enrolled over HTTP, as ``dao agent enroll`` does: (host ID, credential)."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{console.url}/api/agent/enroll", json={"token": console.token(user), "name": "h"}) as resp,
    ):
        doc = await resp.json()
    return doc["host"], doc["credential"]


async def test_sign_up_log_in_log_out(tmp_path: Path) -> None:
    console = Console(tmp_path, users=())
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            page = await (await s.get(f"{console.url}/signup")).text()
            csrf = re.search(r'name="csrf" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
            form = {"csrf": csrf, "name": "carol", "password": PASSWORD}
            async with s.post(f"{console.url}/signup", data=form, allow_redirects=False) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/hosts/add"
                cookie = resp.headers["Set-Cookie"]
            assert "dao_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
            me = await (await s.get(f"{console.url}/api/me")).json()
            assert (me["name"], me["admin"]) == ("carol", True)  # the first account is the admin
            session = s.cookie_jar.filter_cookies(yarl.URL(console.url))["dao_session"].value
            logout = {"csrf": me["csrf"]}
            async with s.post(f"{console.url}/logout", data=logout, allow_redirects=False) as resp:
                assert resp.status == 303
            assert (await (await s.get(f"{console.url}/api/me")).json())["user"] is None
        async with aiohttp.ClientSession(cookies={"dao_session": session}) as replay:
            assert (await replay.get(f"{console.url}/api/hosts")).status == 401  # the old cookie is dead

        async with Client(console.url) as dave:
            dave.csrf = (await dave.json("GET", "/api/me"))["csrf"]
            status, _ = await dave.call("POST", "/api/signup", {"name": "dave", "password": PASSWORD})
            me = await dave.json("GET", "/api/me")
            assert status == 201 and me["admin"] is False
            dave.csrf = me["csrf"]  # signed in now: the session's token
            for body, error in [
                ({"name": "carol", "password": PASSWORD}, "taken"),
                ({"name": "x", "password": PASSWORD}, "user name"),
                ({"name": "erin", "password": "short"}, "password"),
            ]:
                status, doc = await dave.call("POST", "/api/signup", body)
                assert status == 400 and error in doc["error"], doc
        async with Client(console.url) as anyone:
            anyone.csrf = (await anyone.json("GET", "/api/me"))["csrf"]
            for name, password in [("carol", "wrong password"), ("nobody", PASSWORD)]:
                status, doc = await anyone.call("POST", "/api/login", {"name": name, "password": password})
                assert status == 401 and doc["error"] == "wrong name or password"  # the same, known name or not
            assert (await anyone.login("carol")).csrf
    finally:
        console.stop()
    with sqlite3.connect(console.data / "dao.db") as db:
        stored = [row[0] for row in db.execute("SELECT password_hash FROM console_accounts")]
        users = {row[0] for row in db.execute("SELECT name FROM dao_users")}
    assert len(stored) == 2 and all(h.startswith("scrypt$") and PASSWORD not in h for h in stored)
    assert {"carol", "dave"} <= users  # each account is an accelerator user: one identity


async def test_state_changing_requests_need_the_csrf_token(console: Console, alice: Client) -> None:
    assert (await alice.call("POST", "/api/hosts/enroll-token"))[0] == 201
    for headers in ({"X-CSRF-Token": ""}, {"X-CSRF-Token": "guessed" * 4}):
        status, doc = await alice.call("POST", "/api/hosts/enroll-token", headers=headers)
        assert status == 403 and "CSRF" in doc["error"]
    status, doc = await alice.call("POST", "/api/hosts/enroll-token", headers={"Origin": "http://127.0.0.2:9"})
    assert status == 403 and "cross-origin" in doc["error"]
    async with alice.session.post(f"{console.url}/logout", data={}, allow_redirects=False) as resp:
        assert resp.status == 403  # a form without its token does not even log out
    assert (await alice.json("GET", "/api/me"))["name"] == "alice"


async def test_another_user_gets_404_on_every_route_of_a_host(console: Console, alice: Client, bob: Client) -> None:
    host, _ = await enrolled(console, "alice")
    assert [h["id"] for h in await alice.json("GET", "/api/hosts")] == [host]
    assert await bob.json("GET", "/api/hosts") == []
    routes = [
        ("GET", f"/api/hosts/{host}", None),
        ("GET", f"/api/hosts/{host}/samples?range=1h", None),
        ("POST", f"/api/hosts/{host}/containers/web/stop", None),
        ("POST", f"/api/hosts/{host}/containers/web/remove", None),
        ("GET", f"/api/hosts/{host}/containers/web/logs", None),
        ("POST", f"/api/hosts/{host}/pull", {"ref": "debian:12"}),
        ("POST", f"/api/hosts/{host}/clean/plan", None),
        ("POST", f"/api/hosts/{host}/clean/apply", {"plan_id": "0123456789abcdef"}),
        ("PUT", f"/api/hosts/{host}/labels", {"labels": {"owned": "bob"}}),
        ("POST", f"/api/hosts/{host}/revoke", None),
        ("GET", f"/hosts/{host}", None),
    ]
    for method, path, body in routes:
        status, _ = await bob.call(method, path, body)
        assert status == 404, (method, path, status)
        status, _ = await alice.call(method, path.replace(host, "0" * 16), body)  # nobody's: the same answer
        assert status == 404, (method, path, status)
    [mine] = await alice.json("GET", "/api/hosts")
    assert mine["revoked"] is False and mine["labels"] == {}
    async with Client(console.url) as anonymous:
        assert (await anonymous.call("GET", f"/api/hosts/{host}"))[0] == 401
        async with anonymous.session.get(f"{console.url}/hosts/{host}", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/login"


async def test_live_updates_go_to_the_owner_only(console: Console, alice: Client, bob: Client) -> None:
    host, credential = await enrolled(console, "alice")
    channel = console.url.replace("http", "ws") + "/api/agent/channel"
    async with (
        alice.session.get(f"{console.url}/api/live") as alice_live,
        bob.session.get(f"{console.url}/api/live") as bob_live,
        aiohttp.ClientSession() as agent,
        agent.ws_connect(channel, headers={"Authorization": f"Bearer {credential}"}) as ws,
    ):
        assert (await alice_live.content.readline()).startswith(b": connected")
        assert (await bob_live.content.readline()).startswith(b": connected")
        await ws.send_str('{"t": "hello", "version": "test"}')
        await ws.send_str('{"t": "metrics", "seq": 1, "samples": [{"at": 1, "cpu": 42}]}')
        seen = []
        async with asyncio.timeout(10):
            while len(seen) < 2:
                line = await alice_live.content.readline()
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:]))
        assert [(m["kind"], m["host"]) for m in seen] == [("online", host), ("metrics", host)]
        assert seen[1]["data"]["cpu"] == 42
        await bob_live.content.readline()  # the blank line after ": connected"
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                line = await bob_live.content.readline()
                raise AssertionError(f"bob was told of alice's host: {line!r}")


async def test_bad_input_gets_a_clear_4xx_and_the_console_goes_on(console: Console, alice: Client) -> None:
    host, credential = await enrolled(console, "alice")
    channel = console.url.replace("http", "ws") + "/api/agent/channel"
    async with (
        aiohttp.ClientSession() as agent,
        agent.ws_connect(channel, headers={"Authorization": f"Bearer {credential}"}) as ws,
    ):
        await ws.send_str('{"t": "hello", "version": "test"}')
        await ws.send_str('{"t": "ping", "at": 1, "pad": "' + "x" * 300_000 + '"}')  # over the frame limit
        msg = await ws.receive(timeout=10)
        while msg.type == aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
    labels = f"/api/hosts/{host}/labels"
    cases = [
        ("PUT", labels, {"labels": "region=eu"}, 400),
        ("PUT", labels, {"labels": {f"k{i}": "v" for i in range(100)}}, 400),
        ("PUT", labels, {"labels": {"bad key!": "v"}}, 400),
        ("PUT", labels, {"labels": {"ok": 1}}, 400),
        ("PUT", labels, ["not", "an", "object"], 400),
        ("POST", f"/api/hosts/{host}/pull", {"ref": "; rm -rf /"}, 400),
        ("POST", f"/api/hosts/{host}/pull", {}, 400),
        ("GET", f"/api/hosts/{host}/samples?range=1y", None, 400),
        ("POST", f"/api/hosts/{host}/clean/apply", {"plan_id": 7}, 404),
        ("POST", f"/api/hosts/{host}/containers/{'x' * 300}/stop", None, 404),
    ]
    for method, path, body, want in cases:
        status, doc = await alice.call(method, path, body)
        assert status == want and isinstance(doc, dict) and doc.get("error"), (method, path, body, status, doc)
    status, _ = await alice.call("PUT", labels, data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400
    status, _ = await alice.call("PUT", labels, data=b"x" * (2 * 1024 * 1024))
    assert status == 413
    assert (await alice.json("PUT", labels, {"labels": {"region": "eu"}}))["labels"] == {"region": "eu"}
    assert (await alice.json("GET", f"/api/hosts/{host}"))["labels"] == {"region": "eu"}
