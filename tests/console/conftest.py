"""What the browser tests share: headless Chromium (Debian's, never a downloaded one) driven by Playwright,
and where their screenshots go (``DAO_SCREENSHOTS=docs/img`` refreshes the README's)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("DAO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser() -> Iterator[object]:
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("pip install playwright (make test does)", pytrace=False)
    if CHROMIUM is None:
        pytest.fail("no chromium: apt-get install chromium (make test does)", pytrace=False)
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("DAO_SCREENSHOTS") or tmp_path / "shots")
    where.mkdir(parents=True, exist_ok=True)
    return where


def sign_in(page: object, url: str, name: str) -> None:
    """Log in through the page, as a person does."""
    from tests.services.console import PASSWORD

    page.goto(f"{url}/login")  # type: ignore[attr-defined]
    page.fill("input[name=name]", name)  # type: ignore[attr-defined]
    page.fill("input[name=password]", PASSWORD)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url(f"{url}/")  # type: ignore[attr-defined]
