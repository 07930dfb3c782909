"""The Accelerator page's data, against a real console and a real mirror on the same database: the address
the console shows is the one the mirror answers to (and only its hash is stored), the usage of a pull made
through it, and a quota request that an admin approves and the running mirror then applies."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import World
from tests.console.conftest import shots, sign_in
from tests.services.console import Client, Console
from tests.services.mirror import Mirror, skopeo_copy
from tests.services.procs import free_port

DOMAIN = "mirror.test"


def stored(console: Console, query: str, *args: object) -> list[tuple]:
    with sqlite3.connect(console.data / "dao.db") as db:
        return list(db.execute(query, args))


@pytest.fixture
def console(tmp_path: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    c = Console(tmp_path, args=("--accelerator-url", f"http://{DOMAIN}:{port}"))
    c.mirror_port = port  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.stop()
        assert "Traceback" not in c.log.read_text()


async def test_the_address_is_shown_again_and_only_its_hash_is_stored(console: Console) -> None:
    async with Client(console.url) as alice:
        await alice.login("alice")
        unknown = await alice.json("GET", "/api/accelerator")  # an accelerator user from before the console:
        assert unknown["configured"] and unknown["address"] is None  # their address is theirs, not ours to show
        await alice.json("POST", "/api/accelerator/address")
        first = await alice.json("GET", "/api/accelerator")
        label = re.fullmatch(rf"http://([a-z2-7]{{24}})\.{DOMAIN}:\d+", first["address"])
        assert label, first
        assert first["command"] == f"sudo dao mirror use {first['address']}"
        assert (await alice.json("GET", "/api/accelerator"))["address"] == first["address"]  # the same, again
        [(hashed,)] = stored(console, "SELECT address FROM dao_users WHERE id = 'alice'")
        assert hashed == "sha256:" + hashlib.sha256(label[1].encode()).hexdigest()
        assert label[1].encode() not in (console.data / "dao.db").read_bytes()
        made = await alice.json("POST", "/api/accelerator/address")
        assert made["address"] != first["address"]
        assert (await alice.json("GET", "/api/accelerator"))["address"] == made["address"]
        assert stored(console, "SELECT address FROM dao_users WHERE id = 'alice'")[0][0] != hashed


async def test_a_quota_request_is_answered_by_an_admin_only(console: Console) -> None:
    async with Client(console.url) as alice, Client(console.url) as bob:
        await alice.login("alice")  # the first account: the admin
        await bob.login("bob")
        for bad in ({"quota": "lots"}, {"quota": "-5GiB"}, {"quota": 0}, {"quota": "5GiB", "reason": "x" * 501}):
            status, doc = await bob.call("POST", "/api/accelerator/quota-requests", bad)
            assert status == 400 and doc["error"], (bad, doc)
        asked = await bob.json("POST", "/api/accelerator/quota-requests", {"quota": "100GiB", "reason": "CI"})
        status, _ = await bob.call("POST", "/api/accelerator/quota-requests", {"quota": "200GiB"})
        assert status == 409  # one waiting at a time
        assert (await bob.call("GET", "/api/admin/quota-requests"))[0] == 403
        assert (await bob.call("POST", f"/api/admin/quota-requests/{asked['id']}/approve"))[0] == 403
        [waiting] = await alice.json("GET", "/api/admin/quota-requests")
        assert (waiting["id"], waiting["user"], waiting["quota_bytes"]) == (asked["id"], "bob", 100 * 1024**3)
        assert (await alice.json("POST", f"/api/admin/quota-requests/{asked['id']}/approve"))["status"] == "approved"
        assert (await alice.call("POST", f"/api/admin/quota-requests/{asked['id']}/decline"))[0] == 409  # once
        assert (await alice.call("POST", "/api/admin/quota-requests/nosuch/approve"))[0] == 404
        assert stored(console, "SELECT quota_bytes FROM dao_users WHERE id = 'bob'") == [(100 * 1024**3,)]
        mine = await bob.json("GET", "/api/accelerator")
        assert mine["quota"] == 100 * 1024**3 and mine["requests"][0]["status"] == "approved"
        assert (await alice.json("GET", "/api/accelerator"))["requests"] == []  # nobody sees another's


def test_usage_of_a_pull_through_the_address_and_an_approved_quota_reaching_the_mirror(
    console: Console, world: World, tmp_path: Path, named_hosts: Callable[..., None], browser
) -> None:
    """In the browser (its session also makes the API calls: Playwright's sync API and asyncio do not mix)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        sign_in(page, console.url, "alice")
        csrf = {"X-CSRF-Token": page.get_attribute("meta[name=csrf]", "content") or ""}
        address = page.request.post(f"{console.url}/api/accelerator/address", headers=csrf).json()["address"]
        host = address.split("://", 1)[1]
        named_hosts(host.split(":")[0])
        image = world.image("dao-test/schema2:v1")
        blobs = sum(p.stat().st_size for p in image.blobs.values())
        assert console.dao("mirror", "users", "quota", "alice", str(blobs * 2)).returncode == 0  # one pull fits
        mirror = Mirror(
            tmp_path / "mirror",
            world.upstream.url,
            port=console.mirror_port,  # type: ignore[attr-defined]
            args=(
                "--mirror-domain", DOMAIN, "--usage-flush", "0.3", "--no-anonymous",
                "--database", f"sqlite:///{console.data}/dao.db",
            ),
        )  # fmt: skip
        try:
            done = skopeo_copy(host, "dao-test/schema2:v1", tmp_path / "first")
            assert done.returncode == 0, done.stderr  # under the quota when it began
            quota = blobs // 2  # then the operator lowers it below what was pulled
            assert console.dao("mirror", "users", "quota", "alice", str(quota)).returncode == 0
            time.sleep(1)  # usage flushed, quotas re-read
            seen = page.request.get(f"{console.url}/api/accelerator").json()
            assert seen["used"] >= blobs and seen["quota"] == quota
            assert seen["months"][-1]["month"] == seen["month"] and seen["months"][-1]["pulls"] >= 1
            assert _manifest_status(mirror, host) == 429  # used up (a plain GET: skopeo retries a 429 for a while)

            page.goto(f"{console.url}/accelerator")
            usage = page.locator("#usage").inner_text()
            assert re.fullmatch(r"[\d.]+ MiB of [\d.]+ MiB", usage), usage
            assert page.locator("#address").inner_text() == address
            page.wait_for_function("Number(document.getElementById('chart-months').dataset.bars) >= 1")
            page.fill("#quota-wanted", "10GiB")
            page.fill("#quota-reason", "a build farm")
            page.click("#quota-form button[type=submit]")
            page.locator("#my-requests td.status", has_text="pending").wait_for()
            page.locator("#pending-requests tr", has_text="a build farm").wait_for()
            page.screenshot(path=shots(tmp_path) / "console-accelerator.png", full_page=True)
            page.locator("#pending-requests button[data-verdict=approve]").click()
            page.locator("#my-requests td.status", has_text="approved").wait_for()
            page.locator("#usage", has_text="of 10.0 GiB").wait_for()
            time.sleep(1)  # the mirror re-reads quotas every flush
            assert _manifest_status(mirror, host) == 200
            again = skopeo_copy(host, "dao-test/schema2:v1", tmp_path / "third")
            assert again.returncode == 0, again.stderr  # the approved quota applies to the running mirror
        finally:
            mirror.stop()
    finally:
        page.close()
    manifest = json.loads((tmp_path / "third" / "manifest.json").read_text())
    assert manifest["config"]["digest"] == json.loads(image.manifest)["config"]["digest"]


def _manifest_status(mirror: Mirror, host: str) -> int:
    request = urllib.request.Request(
        f"{mirror.url}/v2/dao-test/schema2/manifests/v1",
        headers={"Host": host, "Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
