"""The console in a real browser: headless Chromium (Debian's, never a downloaded one) driven by Playwright.

A person signs up, makes the install command, a host enrolled with its token appears online on the page
without a reload, its chart fills with samples, a container is stopped and started from the page (the engine
checked with the docker CLI), and its logs stream in. Each page is photographed on the way: with
``DAO_SCREENSHOTS=docs/img`` the run refreshes the README's pictures.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.console.conftest import shots
from tests.console.test_operations import TICKER
from tests.services import images
from tests.services.console import PASSWORD, Console, agent, dao
from tests.services.dockerd import Dockerd


def test_sign_up_add_a_host_watch_it_and_act_on_it(tmp_path: Path, dockerd: Dockerd, browser) -> None:  # type: ignore[no-untyped-def]
    layer = images.busybox_layer(tmp_path)
    dockerd.docker("import", "--change", 'CMD ["/bin/sh"]', str(layer.path), "base:1")
    dockerd.docker("run", "-d", "--name", "web", "--network", "none", "base:1", "sh", "-c", TICKER)
    dockerd.docker("run", "--name", "batch-job", "--network", "none", "base:1", "true")
    photos = shots(tmp_path)
    console = Console(tmp_path, users=())
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    host_agent = None
    try:
        page.goto(f"{console.url}/login")
        page.screenshot(path=photos / "console-login.png")
        page.click("text=Sign up")
        page.fill("input[name=name]", "alice")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{console.url}/hosts/add")

        page.click("#new-token")
        command = page.locator("#install-command")
        command.wait_for(state="visible")
        text = command.inner_text()
        match = re.fullmatch(rf"curl -fsSL {re.escape(console.url)}/install\.sh \| sudo sh -s -- (daoenroll_\S+)", text)
        assert match, text
        page.screenshot(path=photos / "console-add-host.png")

        page.goto(console.url)  # the hosts page, open before the host exists: it must appear by itself
        page.locator("#hosts tr.empty").wait_for()
        config = tmp_path / "agent.toml"
        enrolled = dao(
            "agent",
            "enroll",
            "--console",
            console.url,
            "--token",
            match[1],
            "--config",
            str(config),
            "--name",
            "build-01",
            data=console.data,
        )
        assert enrolled.returncode == 0, enrolled.stderr
        host_agent = agent(config, tmp_path / "agent.log", f"unix://{dockerd.sock}", interval=0.5)
        row = page.locator("#hosts tbody tr", has_text="build-01")
        row.locator("td.status", has_text="online").wait_for(timeout=30_000)
        row.locator("td.containers", has_text="1 running / 2").wait_for(timeout=10_000)
        page.screenshot(path=photos / "console-hosts.png")

        row.locator("a").click()
        page.wait_for_url(re.compile(r".*/hosts/[0-9a-f]+$"))
        page.wait_for_function("Number(document.getElementById('chart-cpu').dataset.points || 0) >= 3", timeout=20_000)
        web = page.locator("#containers tr[data-name=web]")
        web.locator("td.state", has_text="running").wait_for()
        page.screenshot(path=photos / "console-host.png", full_page=True)

        web.locator("button[data-action=stop]").click()
        web.locator("td.state", has_text="exited").wait_for(timeout=20_000)
        assert dockerd.docker("inspect", "--format", "{{.State.Status}}", "web").stdout.strip() == "exited"
        web.locator("button[data-action=start]").click()
        web.locator("td.state", has_text="running").wait_for(timeout=20_000)
        assert dockerd.docker("inspect", "--format", "{{.State.Status}}", "web").stdout.strip() == "running"

        web.locator("button[data-action=logs]").click()
        page.wait_for_function("(document.getElementById('logs').textContent.match(/tick/g) || []).length >= 5")
        before = page.locator("#logs").inner_text().count("tick")
        page.wait_for_function(
            f"(document.getElementById('logs').textContent.match(/tick/g) || []).length > {before + 3}"
        )  # still streaming, not a one-off dump
        page.screenshot(path=photos / "console-logs.png", full_page=True)
    finally:
        page.close()
        if host_agent is not None:
            host_agent.stop()
            assert "Traceback" not in host_agent.output()
        console.stop()
    assert "Traceback" not in console.log.read_text()
