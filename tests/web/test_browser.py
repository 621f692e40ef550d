"""The web admin in a real headless browser: Debian's chromium driven by Playwright.

The server is the real one (`engine.web.server.make_server`) on an OS-assigned loopback port, over
this module's own PostgreSQL database. Screenshots of the main pages are saved under
``.callgate/screenshots/`` (gitignored) as test artifacts. Setting CALLGATE_TEST_DOCS_SCREENSHOT=1
also refreshes docs/img/web-admin-grid.png.

Skips (with the reason) when the browser or Playwright is missing: scripts/browser.sh installs
chromium in CI; never run ``playwright install`` (no browser downloads).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import ACME, LOCKED_PASSWORD, RESELLER_PASSWORD, ROOT_PASSWORD, VIEWER_PASSWORD

CHROMIUM = os.environ.get("CALLGATE_TEST_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / ".callgate" / "screenshots"
DOCS_SHOT = ROOT / "docs" / "img" / "web-admin-grid.png"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 30_000  # generous: the machine is shared


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: run scripts/browser.sh as root (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[test]')")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser_context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
            accept_downloads=True,
        )
        browser_context.set_default_timeout(TIMEOUT_MS)
        yield browser_context
        browser_context.close()


@pytest.fixture
def page(context: Any, live_server: str) -> Iterator[Any]:
    context.clear_cookies()
    page = context.new_page()
    page.base = live_server
    yield page
    page.close()


def go(page: Any, path: str) -> Any:
    return page.goto(page.base + path)


def shot(page: Any, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Any, name: str, password: str) -> None:
    """With the keyboard only: the name box has the focus, Tab to the password, Enter to send."""
    go(page, "/login")
    # the name box takes the focus by itself (autofocus); wait for it, as a person would
    page.wait_for_function("document.activeElement && document.activeElement.id === 'username'")
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    page.wait_for_url("**/customers")


def create_customer(page: Any, number: str, company: str) -> None:
    go(page, "/customers")
    page.get_by_role("link", name="Create customer").click()
    page.get_by_label("Number", exact=True).fill(number)
    page.get_by_label("E-mail", exact=True).fill(f"c{number}@example.com")
    page.get_by_label("First name").fill("Grace")
    page.get_by_label("Company").fill(company)
    page.get_by_label("Rate group", exact=True).fill("retail")
    page.get_by_role("button", name="Create").click()
    page.get_by_text(f"Customer {number} created").wait_for()


def test_sign_in_search_create_and_see_it_in_the_grid(page: Any) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    create_customer(page, "6600000001", "Browser Co")
    assert page.get_by_text("shown only this once").is_visible()
    go(page, "/customers")
    page.locator("summary", has_text="Search").press("Enter")  # the panel opens from the keyboard
    page.get_by_label("Company", exact=True).fill("Browser Co")
    page.get_by_role("button", name="Search", exact=True).click()
    page.wait_for_url("**company=Browser+Co**")
    grid = page.locator("table.grid tbody")
    assert grid.locator("tr").count() == 1
    assert "6600000001" in grid.inner_text()
    go(page, "/customers?per_page=25")
    shot(page, "grid")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    shot(page, "grid-phone")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # no sideways page scroll
    page.set_viewport_size({"width": 1400, "height": 900})


def test_edit_add_a_sip_device_and_an_ip_map_entry(page: Any) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    create_customer(page, "6600000002", "Edit Co")
    page.get_by_role("link", name="Open the account").click()
    page.get_by_label("Company").fill("Edited Co")
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Saved.").wait_for()
    assert page.get_by_label("Company").input_value() == "Edited Co"
    shot(page, "edit-page")
    page.get_by_role("link", name="SIP devices").click()
    page.get_by_label("Username").fill("dev6600")
    page.get_by_role("button", name="Add").click()
    page.get_by_text("Generated password, shown").wait_for()
    assert "dev6600" in page.locator("table.grid").inner_text()
    page.get_by_role("link", name="IP settings").click()
    page.get_by_label("Network or address (CIDR)").fill("198.51.100.66")
    page.get_by_label("Name").fill("office")
    page.get_by_role("button", name="Add").click()
    page.get_by_text("Added.").wait_for()
    assert "198.51.100.66/32" in page.locator("table.grid").inner_text()
    shot(page, "ip-settings")
    page.get_by_role("link", name="Audit log").click()
    log = page.locator("table.grid").inner_text()
    assert "web:root" in log and "ip_map.create" in log and "sip_device.create" in log


def test_import_a_csv_with_bad_rows_and_read_the_report(page: Any, tmp_path: Path) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    csv_file = tmp_path / "customers.csv"
    rows = ["Account,First Name,Email,Rate Group"]
    rows += [f"66100000{n:02d},Row {n},r{n}@example.com,retail" for n in range(1, 41)]
    rows += ["6610000041,,missing-name@example.com,retail", "6610000042,Bad,not-an-email,retail",
             "6610000043,Bad group,g43@example.com,no-such-group"]  # fmt: skip
    csv_file.write_text("\n".join(rows) + "\n")
    go(page, "/customers")
    page.get_by_role("link", name="Import CSV").click()
    page.get_by_label("CSV file").set_input_files(str(csv_file))
    page.get_by_role("button", name="Import").click()
    page.get_by_text("43 rows: 40 imported, 3 failed").wait_for()  # the page polled, then reloaded
    page.get_by_role("link", name="Show failed rows only").click()
    report = page.locator("table.report tbody tr")
    assert report.count() == 3
    texts = [report.nth(i).inner_text() for i in range(3)]
    assert "6610000041" in texts[0] and "First Name" in texts[0]
    assert "6610000042" in texts[1] and "Email" in texts[1]
    assert "no-such-group" in texts[2] or "rate" in texts[2].lower()
    shot(page, "import-report")
    if os.environ.get("CALLGATE_TEST_DOCS_SCREENSHOT") == "1":  # the README's picture: a full grid
        go(page, "/customers?per_page=25&sort=number")
        page.locator("summary", has_text="Search").press("Enter")
        page.evaluate("document.activeElement.blur()")
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.screenshot(path=str(DOCS_SHOT))
        page.set_viewport_size({"width": 1400, "height": 900})


def test_export_the_current_search(page: Any) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    create_customer(page, "6600000003", "Export Browser Co")
    go(page, "/customers?company=Export+Browser+Co&company_op=eq")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert len(lines) == 2 and "6600000003" in lines[1] and "Export Browser Co" in lines[1]


def test_delete_several_with_confirmation(page: Any) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    create_customer(page, "6600000004", "Delete Co")
    create_customer(page, "6600000005", "Delete Co")
    go(page, "/customers?company=Delete+Co&company_op=eq")
    page.get_by_label("Select all on this page").check()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete selected").click()
    page.get_by_text("Delete 2 accounts?").wait_for()
    page.get_by_role("button", name="Yes, delete").click()
    page.get_by_text("2 accounts deleted").wait_for()
    go(page, "/customers?company=Delete+Co&company_op=eq")
    assert page.get_by_text("No account matches this search.").is_visible()


def test_reseller_opening_another_tenants_customer_gets_not_found(page: Any) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    create_customer(page, "6600000006", "Admin's own")
    context = page.context
    context.clear_cookies()
    sign_in(page, ACME, RESELLER_PASSWORD)
    response = go(page, "/customers/6600000006")
    assert response.status == 404
    assert page.get_by_role("heading", name="Not found").is_visible()
    assert "Admin's own" not in page.content()
    response = go(page, "/customers/6600000006/sip-devices")
    assert response.status == 404


def test_a_form_without_its_csrf_token_is_refused(page: Any) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    go(page, "/customers/new")
    page.get_by_label("Number", exact=True).fill("6600000007")
    page.get_by_label("E-mail", exact=True).fill("c6600000007@example.com")
    page.get_by_label("First name").fill("Forged")
    page.get_by_label("Rate group", exact=True).fill("retail")
    page.evaluate("document.querySelector('form.account-form input[name=csrf]').remove()")
    with page.expect_navigation():
        page.get_by_role("button", name="Create").click()
    assert "did not come from this site" in page.content()
    go(page, "/customers?number=6600000007&number_op=eq")
    assert page.get_by_text("No account matches this search.").is_visible()


def test_login_is_throttled(page: Any) -> None:
    go(page, "/login")
    for _ in range(5):
        page.get_by_label("User name or reseller account number").fill("locked")
        page.get_by_label("Password").fill("wrong password")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("is not right").wait_for()
    page.get_by_label("User name or reseller account number").fill("locked")
    page.get_by_label("Password").fill(LOCKED_PASSWORD)  # right, and refused all the same
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Too many failed sign-ins").wait_for()
    assert "/login" in page.url


def test_read_only_user_cannot_change_anything(page: Any) -> None:
    sign_in(page, "root", ROOT_PASSWORD)
    create_customer(page, "6600000008", "Read Only Co")
    page.context.clear_cookies()
    sign_in(page, "viewer", VIEWER_PASSWORD)
    assert page.get_by_role("link", name="Create customer").count() == 0
    assert page.get_by_role("button", name="Delete selected").count() == 0
    go(page, "/customers/6600000008")
    assert page.get_by_role("button", name="Save").count() == 0
    # a write forced through the page's own form is refused by the server
    page.evaluate(
        "(() => { const f = document.querySelector('form.account-form');"
        " const b = document.createElement('button'); b.type = 'submit'; b.id = 'force';"
        " f.appendChild(b); })()"
    )
    page.get_by_label("Company").fill("Changed")
    with page.expect_navigation():
        page.locator("#force").click()
    assert "signed in read-only" in page.content()
    go(page, "/customers/6600000008")
    assert page.get_by_label("Company").input_value() == "Read Only Co"


def test_why_was_this_call_rejected(page: Any, web_config: Any) -> None:
    from engine.sync import publish_once

    sign_in(page, "root", ROOT_PASSWORD)
    go(page, "/customers/new")
    page.get_by_label("Number", exact=True).fill("6600000009")
    page.get_by_label("E-mail", exact=True).fill("c6600000009@example.com")
    page.get_by_label("First name").fill("Caller")
    page.get_by_label("Rate group", exact=True).fill("retail")
    page.get_by_label("Create a SIP device").select_option("yes")
    page.get_by_label("SIP username").fill("why6600")
    page.get_by_role("button", name="Create").click()
    page.get_by_text("Customer 6600000009 created").wait_for()
    publish_once(web_config)
    go(page, "/customers/6600000009/explain")
    page.get_by_label("Dialled number").fill("442071234567")
    page.get_by_role("button", name="Explain").click()
    page.locator("section.decision").wait_for()
    decision = page.locator("section.decision").inner_text()
    assert "Rejected: NO_SUFFICIENT_FUND" in decision and "account found via SIP device why6600" in decision
    shot(page, "explain")
    assert page.locator("ol.steps li").count() >= 1


def test_cdrs_filter_totals_and_export(page: Any, db_url: str) -> None:
    from tests.web.test_views import _cdr

    sign_in(page, "root", ROOT_PASSWORD)
    create_customer(page, "6600000010", "Calls Co")
    _cdr(
        db_url,
        "6600000010",
        "b-call-1",
        billsec=125,
        customer_debit="0.25",
        carrier_cost="0.10",
        margin="0.15",
    )
    _cdr(
        db_url,
        "6600000010",
        "b-call-2",
        billsec=30,
        customer_debit="0.06",
        carrier_cost="0.02",
        margin="0.04",
    )
    _cdr(db_url, "6600000010", "b-call-3", reject_reason="NO_ROUTE", hangup_cause="CALL_REJECTED")
    go(page, "/customers/6600000010/cdrs")
    assert (
        "3 calls, 2 answered, 155 s billed, customer debit 0.31 USD" in page.locator("p.summary").inner_text()
    )
    page.get_by_label("Rejected").select_option("yes")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**rejected=yes**")
    assert "1 call, 0 answered" in page.locator("p.summary").inner_text()
    page.get_by_label("Rejected").select_option("")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**rejected=&**")
    shot(page, "cdrs")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("uuid,")


@pytest.mark.e2e  # it checks what the browser scenarios above (e2e) saved in this run
def test_screenshots_were_saved() -> None:
    saved = {p.stem for p in SHOTS.glob("*.png")} if SHOTS.exists() else set()
    if not shutil.which(CHROMIUM) and not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no browser, no screenshots")
    pytest.importorskip("playwright", reason="Playwright is not installed: no scenario ran")
    assert {"grid", "edit-page", "import-report", "explain"} <= saved
