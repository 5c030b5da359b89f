"""The worklist in a real headless Chromium (Debian's chromium, driven by Playwright; no browser download).

Set LUNGVISION_SCREENSHOT=docs/worklist.png to also save the README's screenshot.
"""

import os
from pathlib import Path

import pytest

from tests.kit.browser import CHROMIUM, launch_chromium
from tests.kit.site import TOKEN


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # CI installs it (scripts/setup.sh --test): a missing browser is a failure there
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/setup.sh --test does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


def test_worklist_shows_findings_thumbnails_in_priority_order(browser, live_server, site) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(f"{live_server}/", wait_until="networkidle")
    rows = page.locator("#worklist tr.study")
    order = [rows.nth(i).get_attribute("data-study-uid") for i in range(rows.count())]
    expected = [site.studies[key].study_uid for key in ("ACC-POS-HIGH", "ACC-POS-LOW", "ACC-FAILED", "ACC-NEG")]
    assert order[:4] == expected
    top = rows.nth(0)
    assert top.locator("td.finding").inner_text() == "POSITIVE"
    assert top.locator("td.probability").inner_text() == "0.930"
    assert top.locator(".status").inner_text() == "delivered"
    thumbnail = top.locator("img.thumb")
    width = thumbnail.evaluate("img => img.complete ? img.naturalWidth : 0")
    assert 0 < width <= site.settings.web.thumbnail_px  # the heatmap PNG really loaded
    assert "Patient" not in page.locator("#worklist thead").text_content()  # not signed in: no patient column
    statuses = {rows.nth(i).locator(".status").inner_text() for i in range(rows.count())}
    assert {"analysing", "received", "failed", "delivered"} <= statuses
    if os.environ.get("LUNGVISION_SCREENSHOT"):
        page.screenshot(path=os.environ["LUNGVISION_SCREENSHOT"], full_page=True)

    page.select_option("select[name=finding]", "NEGATIVE")  # the filter submits itself
    page.wait_for_url("**finding=NEGATIVE**")
    assert [
        page.locator("#worklist tr.study").nth(i).get_attribute("data-study-uid")
        for i in range(page.locator("#worklist tr.study").count())
    ] == [site.studies["ACC-NEG"].study_uid]

    page.goto(f"{live_server}/studies/{site.studies['ACC-POS-HIGH'].study_uid}", wait_until="networkidle")
    picture = page.locator("img[alt='heatmap Secondary Capture']")
    assert picture.evaluate("img => img.naturalWidth") > site.settings.web.thumbnail_px
    assert "Pneumonia" in page.locator("pre").inner_text()
    assert "pacs" in page.locator("table").first.inner_text()
    page.close()


def test_signed_in_operator_sees_patient_fields(browser, live_server, site) -> None:
    context = browser.new_context(http_credentials={"username": "operator", "password": TOKEN})
    page = context.new_page()
    page.goto(f"{live_server}/login", wait_until="networkidle")  # 401 challenge → credentials → the worklist
    assert page.url == f"{live_server}/"
    assert "Patient" in page.locator("#worklist thead").text_content()
    row = page.locator(f"tr[data-study-uid='{site.studies['ACC-POS-HIGH'].study_uid}']")
    assert site.studies["ACC-POS-HIGH"].patient_id in row.inner_text()
    context.close()


def test_signed_in_operator_agrees_with_a_finding_on_the_study_page(browser, live_server, site) -> None:
    study = site.studies["ACC-POS-LOW"]
    context = browser.new_context(http_credentials={"username": "operator", "password": TOKEN})
    page = context.new_page()
    page.goto(f"{live_server}/login", wait_until="networkidle")  # the challenge: credentials are sent from now on
    page.goto(f"{live_server}/studies/{study.study_uid}", wait_until="networkidle")
    assert page.locator("#review .verdict").count() == 0
    page.get_by_role("button", name="Agree", exact=True).click()  # a real form POST with the browser's Origin
    page.wait_for_selector("#review .verdict.agree")
    assert page.url == f"{live_server}/studies/{study.study_uid}"
    assert page.locator("#review .verdict").inner_text() == "agree"
    message_id = site.store.study_results(study.study_uid)[-1].message_id
    assert site.store.review(message_id).verdict.value == "agree"
    page.goto(f"{live_server}/", wait_until="networkidle")
    assert page.locator(f"tr[data-study-uid='{study.study_uid}'] td.review").inner_text() == "agree"
    context.close()
