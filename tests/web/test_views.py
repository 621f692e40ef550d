"""The web admin's pages through Flask's test client (no browser): real PostgreSQL, the real service."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import pytest

from engine.web.auth import Throttle
from tests.admin.conftest import query
from tests.web.conftest import (
    ACME,
    ACME_SUB,
    RESELLER_PASSWORD,
    ROOT_PASSWORD,
    VIEWER_PASSWORD,
    Browser,
)

Make = Callable[..., Browser]


def _create(browser: Browser, number: str, **fields: Any) -> Any:
    browser.get("/customers/new")
    form = {"number": number, "first_name": "Ada", "email": f"c{number}@example.com", "rate_group": "retail"}
    form.update(fields)
    return browser.post("/customers/new", form)


# --------------------------------------------------------------------------- sign-in and sessions


def test_pages_need_a_session_and_open_no_connection(browser_for: Make) -> None:
    anonymous = browser_for()
    response = anonymous.get("/customers")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert anonymous.get("/customers/123/sip-devices").status_code == 302


def test_sign_in_sets_a_hardened_cookie_and_sign_out_ends_it(browser_for: Make) -> None:
    browser = browser_for()
    browser.get("/login")
    response = browser.post("/login", {"username": "root", "password": ROOT_PASSWORD})
    assert response.status_code == 302
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie  # plain HTTP here; "auto" sets it over TLS
    assert browser.get("/customers").status_code == 200
    assert browser.post("/logout").status_code == 302
    assert browser.get("/customers").status_code == 302


def test_cookie_is_secure_over_tls(browser_for: Make) -> None:
    browser = browser_for()
    browser.get("/login", base_url="https://admin.example")
    response = browser.post(
        "/login", {"username": "root", "password": ROOT_PASSWORD}, base_url="https://admin.example"
    )
    assert "Secure" in response.headers["Set-Cookie"]


def test_failed_sign_ins_are_logged_escaped_without_the_password(
    browser_for: Make, caplog: pytest.LogCaptureFixture
) -> None:
    browser = browser_for()
    browser.get("/login")
    with caplog.at_level("INFO", logger="callgate.web"):
        browser.post("/login", {"username": "evil\nweb sign-in: root", "password": "guess-secret-1"})
        browser.post("/login", {"username": "root", "password": ROOT_PASSWORD})
    text = caplog.text
    assert "web sign-in failed: user 'evil\\nweb sign-in: root' from" in text
    assert "web sign-in: root (admin) from" in text
    assert "guess-secret-1" not in text and ROOT_PASSWORD not in text
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_wrong_password_and_unknown_user_get_the_same_answer(browser_for: Make) -> None:
    browser = browser_for()
    browser.get("/login")
    wrong = browser.post(
        "/login", {"username": "root", "password": "nope"}, environ_base={"REMOTE_ADDR": "10.9.0.1"}
    )
    unknown = browser.post(
        "/login", {"username": "nobody", "password": "nope"}, environ_base={"REMOTE_ADDR": "10.9.0.2"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert "not right" in browser.text(wrong) and "not right" in browser.text(unknown)


def test_failed_sign_ins_are_throttled_per_account(web_app: Any, browser_for: Make) -> None:
    web_app.extensions["callgate"]["throttle"] = Throttle(3, 100, 600)
    browser = browser_for()
    browser.get("/login")
    for _ in range(3):
        assert browser.post("/login", {"username": "viewer", "password": "wrong"}).status_code == 401
    # now even the right password is refused, without being checked
    refused = browser.post("/login", {"username": "viewer", "password": VIEWER_PASSWORD})
    assert refused.status_code == 429 and "Too many failed sign-ins" in browser.text(refused)
    # another user is not held back
    assert browser_for("root", ROOT_PASSWORD).get("/customers").status_code == 200


def test_failed_sign_ins_are_throttled_per_source(web_app: Any, browser_for: Make) -> None:
    web_app.extensions["callgate"]["throttle"] = Throttle(100, 4, 600)
    browser = browser_for()
    browser.get("/login")
    for n in range(4):
        browser.post("/login", {"username": f"guess{n}", "password": "x"})
    refused = browser.post("/login", {"username": "root", "password": ROOT_PASSWORD})
    assert refused.status_code == 429


def test_throttle_window_slides() -> None:
    throttle = Throttle(2, 10, 60)
    throttle.failed("a", "s", now=0)
    throttle.failed("a", "s", now=1)
    assert throttle.retry_after("a", "s", now=2) == pytest.approx(58)
    assert throttle.retry_after("a", "s", now=61) == 0  # the first failure left the window
    throttle.succeeded("a")
    assert throttle.retry_after("a", "s", now=2) == 0


def test_after_sign_in_only_a_local_path_is_followed(browser_for: Make) -> None:
    browser = browser_for()
    browser.get("/login")
    response = browser.post(
        "/login", {"username": "root", "password": ROOT_PASSWORD, "next": "//evil.example/x"}
    )
    assert response.headers["Location"].endswith("/customers")


def test_post_without_csrf_token_is_refused(admin: Browser) -> None:
    admin.get("/customers/new")
    form = {"number": "5550000099", "first_name": "X", "email": "x99@example.com", "rate_group": "retail"}
    refused = admin.post("/customers/new", form, csrf=False)
    assert refused.status_code == 400 and "did not come from this site" in admin.text(refused)
    wrong = admin.post("/customers/new", {**form, "csrf": "forged"}, csrf=False)
    assert wrong.status_code == 400
    assert "0 accounts" in admin.text(admin.get("/customers?number=5550000099&number_op=eq"))


def test_login_form_needs_its_csrf_token(browser_for: Make) -> None:
    browser = browser_for()
    response = browser.post("/login", {"username": "root", "password": ROOT_PASSWORD}, csrf=False)
    assert response.status_code == 400


# --------------------------------------------------------------------------- grid


def test_grid_search_sort_and_pages(admin: Browser) -> None:
    for n in range(3):
        assert _create(admin, f"55510000{n:02d}", company=f"Grid Co {n}").status_code == 200
    page = admin.text(admin.get("/customers?company=Grid+Co&company_op=begins&sort=number&per_page=2"))
    assert "3 accounts, page 1 of 2" in page
    assert page.index("5551000000") < page.index("5551000001")
    assert "5551000002" not in page
    second = admin.text(
        admin.get("/customers?company=Grid+Co&company_op=begins&sort=number&per_page=2&page=2")
    )
    assert "5551000002" in second and "5551000000" not in second
    descending = admin.text(admin.get("/customers?company=Grid+Co&company_op=begins&sort=-number"))
    assert descending.index("5551000002") < descending.index("5551000000")


@pytest.mark.parametrize(
    "path",
    [
        "/customers?page=99999999999999999999",
        "/customers?per_page=100000",
        "/customers?sort=bogus",
        "/customers?created_from=99999-01-01",
    ],
)
def test_odd_grid_queries_are_422(admin: Browser, path: str) -> None:
    assert admin.get(path).status_code == 422


@pytest.mark.parametrize("tab", ["refills", "charges", "cdrs", "audit"])
def test_a_huge_page_number_on_a_tab_is_no_error(admin: Browser, tab: str) -> None:
    _create(admin, "5574000001")
    assert admin.get(f"/customers/5574000001/{tab}?page=99999999999999999999").status_code == 200


def test_grid_search_errors_are_shown_not_500(admin: Browser) -> None:
    response = admin.get("/customers?balance_min=lots&page=2")
    assert response.status_code == 422
    assert "Balance min" in admin.text(response)
    nul = admin.get("/customers?number=%00")
    assert nul.status_code == 422 and "NUL" in admin.text(nul)


def test_values_are_escaped(admin: Browser) -> None:
    assert _create(admin, "5552000001", company="<script>alert(1)</script>").status_code == 200
    page = admin.text(admin.get("/customers?number=5552000001&number_op=eq"))
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_export_is_the_current_search(admin: Browser) -> None:
    _create(admin, "5553000001", company="Export Co")
    response = admin.get("/customers/export?company=Export+Co&company_op=eq")
    assert response.mimetype == "text/csv"
    lines = response.get_data(as_text=True).splitlines()
    assert lines[0].startswith("Entity Type,Account Type,Account")
    assert len(lines) == 2 and "5553000001" in lines[1]


# --------------------------------------------------------------------------- create, edit


def test_create_shows_generated_secrets_once(admin: Browser, db_url: str) -> None:
    response = _create(admin, "5554000001", create_sip_device="yes")
    page = admin.text(response)
    assert "shown <strong>only this once</strong>" in page
    pin = re.search(r'PIN</th><td><code class="secret">(\d+)</code>', page)
    assert pin, page
    again = admin.text(admin.get("/customers/5554000001"))
    assert pin.group(1) not in again
    actor = query(db_url, "SELECT actor FROM audit_log WHERE entity_key = '5554000001' ORDER BY id LIMIT 1")
    assert actor == [("web:root",)]


def test_create_errors_sit_next_to_their_field(admin: Browser) -> None:
    response = _create(admin, "12x", email="not-an-email", first_name="", cps="-1")
    assert response.status_code == 422
    page = admin.text(response)
    for name in ("number", "email", "first_name", "cps"):
        block = page[page.index(f'id="f-{name}"') :][:900]
        assert f'id="f-{name}-err"' in block, name
    assert 'value="not-an-email"' in page  # what was typed stays in the form


def test_provider_form_and_rule_errors_from_the_service(admin: Browser) -> None:
    response = _create(admin, "5554000002", account_type="prepaid", credit_limit="5")
    assert response.status_code == 422
    assert "only postpaid accounts have a credit limit" in admin.text(response)
    provider = _create(admin, "9105000001", rate_group="")
    assert provider.status_code == 422  # a customer needs a rate group
    admin.get("/customers/new?kind=provider")
    created = admin.post(
        "/customers/new?kind=provider",
        {"number": "9105000001", "first_name": "Carrier", "email": "p9105@example.com"},
    )
    assert created.status_code == 200 and "Provider 9105000001 created" in admin.text(created)


def test_edit_saves_only_what_changed(admin: Browser, db_url: str) -> None:
    _create(admin, "5555000001", company="Before")
    page = admin.get("/customers/5555000001")
    html = admin.text(page)
    form = dict(re.findall(r'<input id="f-(\w+)" name="\w+" type="(?:text|number)" value="([^"]*)"', html))
    form.update(
        {
            k: v
            for k, v in re.findall(
                r'<select id="f-(\w+)" name="\w+"[^>]*>(?:<option value="[^"]*">[^<]*</option>)*?'
                r'<option value="([^"]*)" selected',
                html,
            )
        }
    )
    form["company"] = "After"
    response = admin.post("/customers/5555000001", form)
    assert response.status_code == 200 and "Saved." in admin.text(response)
    rows = query(
        db_url,
        "SELECT after->>'company', before->>'company' FROM audit_log"
        " WHERE entity_key = '5555000001' AND action = 'account.update'",
    )
    assert rows == [("After", "Before")]
    bad = admin.post("/customers/5555000001", {**form, "email": "broken"})
    assert bad.status_code == 422 and 'id="f-email-err"' in admin.text(bad)


# --------------------------------------------------------------------------- tabs


def test_sip_device_and_ip_map_tabs(admin: Browser, db_url: str) -> None:
    _create(admin, "5556000001")
    admin.get("/customers/5556000001/sip-devices")
    added = admin.post("/customers/5556000001/sip-devices/add", {"username": "dev5556", "context": "default"})
    page = admin.text(added)
    assert "Generated password, shown" in page and "dev5556" in page
    edit = admin.get("/customers/5556000001/sip-devices/dev5556/edit")
    assert edit.status_code == 200
    saved = admin.post("/customers/5556000001/sip-devices/dev5556/edit", {"caller_id_name": "Front desk"})
    assert saved.status_code == 303
    assert "Front desk" in admin.text(admin.get("/customers/5556000001/sip-devices"))
    ip = admin.post("/customers/5556000001/ip-map/add", {"cidr": "198.51.100.7", "name": "office"})
    assert ip.status_code == 303
    listed = admin.text(admin.get("/customers/5556000001/ip-map"))
    assert "198.51.100.7/32" in listed
    entry = re.search(r"/customers/5556000001/ip-map/(\d+)/delete", listed)
    assert entry
    assert admin.post(f"/customers/5556000001/ip-map/{entry.group(1)}/delete").status_code == 303
    assert "198.51.100.7/32" not in admin.text(admin.get("/customers/5556000001/ip-map"))
    bad = admin.post("/customers/5556000001/ip-map/add", {"cidr": "not a network"})
    assert bad.status_code == 422 and 'id="add-cidr-err"' in admin.text(bad)
    actions = [
        r[0]
        for r in query(
            db_url,
            "SELECT action FROM audit_log WHERE actor = 'web:root' AND"
            " account_id = (SELECT id FROM accounts WHERE number = '5556000001'"
            " AND NOT deleted) ORDER BY id",
        )
    ]
    assert actions == [
        "customer.create",
        "sip_device.create",
        "sip_device.update",
        "ip_map.create",
        "ip_map.delete",
    ]
    assert admin.get("/customers/5556000001/ip-map/abc/edit").status_code == 404


@pytest.mark.parametrize(
    ("tab", "form", "shown"),
    [
        ("caller-ids", {"number": "442071230001", "description": "main"}, "442071230001"),
        ("speed-dials", {"key": "1", "number": "442071230002"}, "442071230002"),
        ("blocked-codes", {"prefix": "4490", "description": "premium"}, "premium"),
        ("dids", {"number": "442071110001", "destination_type": "number", "destination": "441234"}, "441234"),
    ],
)
def test_list_tabs_add_and_delete(admin: Browser, tab: str, form: dict[str, str], shown: str) -> None:
    number = {
        "caller-ids": "5557000001",
        "speed-dials": "5557000002",
        "blocked-codes": "5557000003",
        "dids": "5557000004",
    }[tab]
    _create(admin, number)
    admin.get(f"/customers/{number}/{tab}")
    assert admin.post(f"/customers/{number}/{tab}/add", form).status_code == 303
    page = admin.text(admin.get(f"/customers/{number}/{tab}"))
    assert shown in page
    delete = re.search(rf"/customers/{number}/{tab}/([^/]+)/delete", page)
    assert delete
    assert admin.post(delete.group(0)).status_code == 303
    assert shown not in admin.text(admin.get(f"/customers/{number}/{tab}"))


def test_single_tabs_forced_caller_id_and_alert_threshold(admin: Browser) -> None:
    _create(admin, "5558000001")
    assert "None is set." in admin.text(admin.get("/customers/5558000001/forced-caller-id"))
    assert (
        admin.post("/customers/5558000001/single/forced-caller-id", {"number": "442079990001"}).status_code
        == 303
    )
    assert "442079990001" in admin.text(admin.get("/customers/5558000001/forced-caller-id"))
    assert admin.post("/customers/5558000001/single/forced-caller-id", {"action": "clear"}).status_code == 303
    assert "None is set." in admin.text(admin.get("/customers/5558000001/forced-caller-id"))
    admin.get("/customers/5558000001/alert-threshold")
    bad = admin.post("/customers/5558000001/single/alert-threshold", {"notify_enabled": "yes"})
    assert bad.status_code == 422 and "required when notify_enabled is true" in admin.text(bad)
    ok = admin.post(
        "/customers/5558000001/single/alert-threshold",
        {"notify_enabled": "yes", "notify_balance_below": "2.50"},
    )
    assert ok.status_code == 303
    assert 'value="2.50"' in admin.text(admin.get("/customers/5558000001/alert-threshold"))


def test_refill_charge_statement_and_audit(admin: Browser) -> None:
    _create(admin, "5559000001")
    admin.get("/customers/5559000001/refills")
    assert (
        admin.post("/customers/5559000001/money/refills", {"amount": "10.00", "reference": "R-1"}).status_code
        == 303
    )
    assert (
        admin.post(
            "/customers/5559000001/money/charges", {"amount": "2.5", "description": "setup"}
        ).status_code
        == 303
    )
    refills = admin.text(admin.get("/customers/5559000001/refills"))
    assert "R-1" in refills and "setup" not in refills and "Total (1)" in refills
    statement = admin.text(admin.get("/customers/5559000001/charges"))
    assert "setup" in statement and "R-1" in statement and "7.50" in statement
    bad = admin.post("/customers/5559000001/money/refills", {"amount": "-3"})
    assert bad.status_code == 422
    audit = admin.text(admin.get("/customers/5559000001/audit"))
    assert "web:root" in audit and "refill" in audit


# --------------------------------------------------------------------------- scope and read-only


def test_reseller_sees_only_its_subtree(browser_for: Make, service: Any) -> None:
    from engine.admin import schemas as s
    from tests.admin.conftest import customer_body

    service.create_account(s.CustomerCreate(**customer_body(number="5560000001")))  # the admin's
    service.create_account(
        s.CustomerCreate(**customer_body(number="5560000002", reseller=ACME_SUB, rate_group="sub-retail"))
    )
    acme = browser_for(ACME, RESELLER_PASSWORD)
    grid = acme.text(acme.get("/customers?per_page=500"))
    assert "5560000002" in grid and "5560000001" not in grid
    assert "Create provider" not in grid
    for path in (
        "/customers/5560000001",
        "/customers/5560000001/sip-devices",
        "/customers/5560000001/explain",
    ):
        response = acme.get(path)
        assert response.status_code == 404 and "not found" in acme.text(response), path
    acme.get("/customers")
    assert acme.post("/customers/5560000001/ip-map/add", {"cidr": "192.0.2.1"}).status_code == 404
    assert acme.post("/customers/5560000001/sip-devices/add", {"username": "x"}).status_code == 404
    confirm = acme.post("/customers/delete", {"numbers": ["5560000001"], "confirmed": "yes"})
    assert confirm.status_code == 404
    export = acme.get("/customers/export?per_page=500").get_data(as_text=True)
    assert "5560000002" in export and "5560000001" not in export


def test_read_only_users_change_nothing(browser_for: Make, db_url: str) -> None:
    viewer = browser_for("viewer", VIEWER_PASSWORD)
    page = viewer.text(viewer.get("/customers"))
    assert "Create customer" not in page and "Delete selected" not in page and "Export CSV" in page
    viewer.get("/customers/new")  # a page, but nothing can be sent from it
    before = query(db_url, "SELECT count(*) FROM audit_log")
    writes: list[tuple[str, dict[str, Any]]] = [
        (
            "/customers/new",
            {"number": "5561000001", "first_name": "X", "email": "r@example.com", "rate_group": "retail"},
        ),
        ("/customers/delete", {"numbers": ["5551000000"], "confirmed": "yes"}),
        ("/customers/5551000000/ip-map/add", {"cidr": "192.0.2.9"}),
        (
            "/customers/mass-create",
            {"count": "1", "prefix": "7", "account_length": "8", "rate_group": "retail"},
        ),
    ]
    for path, form in writes:
        response = viewer.post(path, form)
        assert response.status_code == 403 and "read-only" in viewer.text(response), path
    assert query(db_url, "SELECT count(*) FROM audit_log") == before
    assert viewer.post("/logout").status_code == 302


# --------------------------------------------------------------------------- delete, long work


def test_delete_several_with_confirmation(admin: Browser, db_url: str) -> None:
    _create(admin, "5562000001")
    _create(admin, "5562000002")
    admin.get("/customers")
    confirm = admin.post(
        "/customers/delete", {"numbers": ["5562000001", "5562000002"], "back": "/\\evil.example"}
    )
    assert confirm.status_code == 200 and "Delete 2 accounts?" in admin.text(confirm)
    assert 'href="/customers">Cancel' in admin.text(confirm)  # never back to another host
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number LIKE '556200000_' AND deleted", ()) == [
        (0,)
    ]
    done = admin.post("/customers/delete", {"numbers": ["5562000001", "5562000002"], "confirmed": "yes"})
    assert "2 accounts deleted" in admin.text(done)
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number LIKE '556200000_' AND deleted", ()) == [
        (2,)
    ]


def _wait_job(browser: Browser, location: str) -> str:
    import time

    job_id = location.rsplit("/", 1)[-1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = browser.get(f"/jobs/{job_id}.json").get_json()
        if status["state"] != "running":
            return job_id
        time.sleep(0.05)
    raise AssertionError("the job did not finish")


def test_import_with_bad_rows_reports_each_row(admin: Browser, db_url: str, browser_for: Make) -> None:
    csv_text = (
        "Account,First Name,Email,Rate Group\n"
        "5563000001,Good,g1@example.com,retail\n"
        "5563000002,,g2@example.com,retail\n"
        "5563000003,Bad mail,not-an-email,retail\n"
        '5563000004,"unclosed,g4@example.com,retail\n'
    )
    admin.get("/customers/import")
    dry = admin.post(
        "/customers/import",
        {"file": (io.BytesIO(csv_text.encode()), "c.csv"), "dry_run": "yes"},
        content_type="multipart/form-data",
    )
    assert dry.status_code == 303
    report = admin.text(admin.get(f"/jobs/{_wait_job(admin, dry.headers['Location'])}"))
    assert "dry run: nothing was imported" in report and "1 would be imported, 3 failed" in report
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number = '5563000001'") == [(0,)]
    real = admin.post(
        "/customers/import",
        {"file": (io.BytesIO(csv_text.encode()), "c.csv")},
        content_type="multipart/form-data",
    )
    job_id = _wait_job(admin, real.headers["Location"])
    report = admin.text(admin.get(f"/jobs/{job_id}"))
    assert "4 rows: 1 imported, 3 failed" in report
    assert "First Name: required" in report and "Email: " in report
    failed = admin.text(admin.get(f"/jobs/{job_id}?failures=1"))
    assert "5563000001" not in failed and "5563000003" in failed
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number = '5563000001'") == [(1,)]
    # the job is its starter's only
    assert browser_for("viewer", VIEWER_PASSWORD).get(f"/jobs/{job_id}").status_code == 404


def test_import_header_problem_is_answered_on_the_form(admin: Browser) -> None:
    admin.get("/customers/import")
    response = admin.post(
        "/customers/import",
        {"file": (io.BytesIO(b"Nonsense,Columns\n1,2\n"), "x.csv")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 422 and "Nonsense" in admin.text(response)


def test_mass_create_runs_in_the_background_and_shows_pins_once(admin: Browser, db_url: str) -> None:
    admin.get("/customers/mass-create")
    response = admin.post(
        "/customers/mass-create",
        {
            "count": "25",
            "prefix": "7731",
            "account_length": "10",
            "rate_group": "retail",
            "generate_pin": "yes",
        },
    )
    assert response.status_code == 303
    job_id = _wait_job(admin, response.headers["Location"])
    first = admin.text(admin.get(f"/jobs/{job_id}"))
    assert "25 customers created" in first
    pins = re.findall(r"<td><code>(\d{4,})</code></td>", first)
    assert len(pins) == 25
    second = admin.text(admin.get(f"/jobs/{job_id}"))
    assert not any(pin in second for pin in pins) and "shown once" in second
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number LIKE %s", ["7731%"]) == [(25,)]


def test_jobs_are_bounded(web_app: Any, admin: Browser) -> None:
    jobs = web_app.extensions["callgate"]["jobs"]
    import threading

    from engine.web.jobs import Job

    gate = threading.Event()
    held = [
        jobs.start(Job("root", "import", f"held {n}"), lambda job: gate.wait(30))
        for n in range(jobs.max_running)
    ]
    try:
        admin.get("/customers/mass-create")
        refused = admin.post(
            "/customers/mass-create",
            {"count": "1", "prefix": "7732", "account_length": "10", "rate_group": "retail"},
        )
        assert refused.status_code == 429 and "jobs are running already" in admin.text(refused)
    finally:
        gate.set()
    assert len(held) == jobs.max_running


# --------------------------------------------------------------------------- explain


def test_explain_needs_the_accounts_own_identification(admin: Browser) -> None:
    _create(admin, "5564000001")
    page = admin.get("/customers/5564000001/explain?dest=4420&ip=203.0.113.9")
    assert "inside one of this account" in admin.text(page)
    page = admin.get("/customers/5564000001/explain?dest=4420&sip_user=someone-else")
    assert "Choose one of this account" in admin.text(page)


def test_explain_shows_the_engines_decision(admin: Browser, web_config: Any) -> None:
    from engine.sync import publish_once

    _create(admin, "5565000001", create_sip_device="yes", sip_username="expl5565")
    publish_once(web_config)
    page = admin.text(admin.get("/customers/5565000001/explain?dest=442071234567&sip_user=expl5565"))
    # a prepaid customer with nothing on its balance: identified by its device, refused for funds
    assert "Rejected: NO_SUFFICIENT_FUND" in page
    assert "<strong>identify</strong>: account found via SIP device expl5565" in page
    assert "SIP 402" in page


def test_long_work_never_blocks_the_page(admin: Browser, db_url: str) -> None:
    """A mass create of 10,000 runs while the grid and the progress answer; prints the numbers
    quoted in docs/web-admin.md (run with -s)."""
    import time

    admin.get("/customers/mass-create")
    started = time.monotonic()
    response = admin.post(
        "/customers/mass-create",
        {
            "count": "10000",
            "prefix": "78",
            "account_length": "10",
            "rate_group": "retail",
            "generate_pin": "yes",
        },
    )
    assert response.status_code == 303
    job_id = response.headers["Location"].rsplit("/", 1)[-1]
    answered_while_running, slowest = 0, 0.0
    progress_seen: set[int] = set()
    while True:
        before = time.monotonic()
        grid = admin.get("/customers?per_page=100")
        status = admin.get(f"/jobs/{job_id}.json").get_json()
        slowest = max(slowest, time.monotonic() - before)
        assert grid.status_code == 200
        if status["state"] != "running":
            break
        answered_while_running += 1
        progress_seen.add(status["done"])
        assert time.monotonic() - started < 600, "the mass create did not finish"
        time.sleep(0.2)
    assert status["state"] == "done", status
    assert answered_while_running >= 1  # the pages answered while the job ran
    assert len(progress_seen) >= 2 or answered_while_running == 1  # progress moved between polls
    print(
        f"\nmass create of 10,000: {time.monotonic() - started:.1f} s; {answered_while_running} grid+progress"
        f" answers while it ran, slowest pair {slowest * 1000:.0f} ms"
    )
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number LIKE %s AND NOT deleted", ["78%"]) == [
        (10000,)
    ]
    first = admin.text(admin.get(f"/jobs/{job_id}"))
    assert first.count("<tr><td><a href=") == 10000  # every generated PIN, once


def test_a_session_ends_when_the_reseller_cannot_sign_in_any_more(browser_for: Make, db_url: str) -> None:
    from engine.db.hashing import hash_secret

    sub = browser_for(ACME_SUB, RESELLER_PASSWORD)
    assert sub.get("/customers").status_code == 200
    query(
        db_url,
        "UPDATE accounts SET password_hash = %s WHERE number = %s RETURNING id",
        [hash_secret("Another-pass-2", n=2**10), ACME_SUB],
    )
    assert sub.get("/customers").status_code == 302  # a new password ends the old sessions
    again = browser_for(ACME_SUB, "Another-pass-2")
    query(db_url, "UPDATE accounts SET status = 'inactive' WHERE number = %s RETURNING id", [ACME_SUB])
    try:
        assert again.get("/customers").status_code == 302  # so does deactivation
    finally:
        query(
            db_url,
            "UPDATE accounts SET status = 'active', password_hash = %s WHERE number = %s RETURNING id",
            [hash_secret(RESELLER_PASSWORD, n=2**10), ACME_SUB],
        )


def test_pages_are_hardened_and_odd_urls_are_not_found(admin: Browser) -> None:
    response = admin.get("/customers")
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    for path in ("/customers/12ab", "/customers/" + "9" * 40, "/customers/5551000000/nope", "/jobs/unknown"):
        assert admin.get(path).status_code == 404, path
    assert admin.get("/favicon.ico").status_code == 204


def test_throttle_memory_is_bounded() -> None:
    throttle = Throttle(3, 1000, 60, max_keys=100)
    for n in range(1000):
        throttle.failed(f"made-up-{n}", "10.0.0.1", now=float(n) / 100)
    assert len(throttle._failures) <= 100
    assert throttle.retry_after("10.0.0.1", "10.0.0.1", now=10.0) > 0  # the source's count survives


def test_hash_password_command_prints_a_users_entry(
    capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    from engine.cli import main
    from engine.config import WebSettings
    from engine.db.hashing import verify_secret

    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-staff-password\n"))
    assert main(["web", "hash-password", "alice", "--role", "readonly"]) == 0
    line = capsys.readouterr().out.strip()
    name, _, value = line.partition(" = ")
    role, _, stored = value.strip('"').partition(":")
    assert (name, role) == ("alice", "readonly") and verify_secret("a-long-staff-password", stored)
    assert WebSettings(users={name: value.strip('"')}).users[name].startswith("readonly:")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["web", "hash-password", "bob"]) == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"secret_key": "short"}, "secret_key must be at least 32"),
        ({"users": {"1234": "admin:scrypt$x"}}, "not a user name"),
        ({"users": {"alice": "owner:scrypt$x"}}, "expected '<admin|readonly>:<scrypt hash>'"),
        ({"cookie_secure": "sometimes"}, "cookie_secure"),
        ({"max_jobs": 0}, "max_jobs"),
    ],
)
def test_bad_web_settings_are_refused_at_start(settings: dict[str, Any], message: str) -> None:
    from engine.config import ConfigError, WebSettings

    with pytest.raises(ConfigError, match=re.escape(message)):
        WebSettings(**settings)


def test_a_reseller_listed_read_only_changes_nothing(web_config: Any, db_url: str) -> None:
    import dataclasses

    from engine.web.app import create_app
    from tests.web.conftest import web_settings

    app = create_app(dataclasses.replace(web_config, web=web_settings(readonly_resellers=(ACME,))))
    browser = Browser(app.test_client())
    assert browser.login(ACME, RESELLER_PASSWORD).status_code == 302
    page = browser.text(browser.get("/customers"))
    assert "reseller 2100000001, read-only" in page and "Create customer" not in page
    refused = browser.post("/customers/mass-create", {"count": "1", "prefix": "7", "account_length": "8"})
    assert refused.status_code == 403


def test_a_session_ends_after_session_minutes(admin: Browser, monkeypatch: Any) -> None:
    import time as clock

    assert admin.get("/customers").status_code == 200
    later = clock.time() + 481 * 60
    monkeypatch.setattr("engine.web.app.time.time", lambda: later)
    assert admin.get("/customers").status_code == 302


def test_an_upload_larger_than_the_limit_gets_a_page(web_config: Any) -> None:
    import dataclasses

    from engine.web.app import create_app
    from tests.web.conftest import ROOT_PASSWORD, web_settings

    app = create_app(dataclasses.replace(web_config, web=web_settings(max_upload_mb=1)))
    browser = Browser(app.test_client())
    browser.login("root", ROOT_PASSWORD)
    browser.get("/customers/import")
    big = io.BytesIO(b"Account,First Name,Email,Rate Group\n" + b"1,a,b@c.de,retail\n" * 70000)
    response = browser.post(
        "/customers/import", {"file": (big, "big.csv")}, content_type="multipart/form-data"
    )
    assert response.status_code == 413 and "larger than this server accepts" in browser.text(response)


# --------------------------------------------------------------------------- accounting tabs


def _cdr(db_url: str, number: str, uuid: str, **values: Any) -> None:
    row = {
        "billsec": 0, "customer_debit": "0", "carrier_cost": "0", "margin": "0", "direction": "outbound",
        "dialled": "442071234567", "hangup_cause": "NORMAL_CLEARING", "reject_reason": None, **values,
    }  # fmt: skip
    query(
        db_url,
        "INSERT INTO cdrs (uuid, started_at, account_id, account_number, chain, direction, dialled, billsec,"
        " customer_debit, carrier_cost, margin, hangup_cause, reject_reason)"
        " SELECT %s, now() - interval '1 hour', a.id, a.number, ARRAY[a.id, a.reseller_id]::bigint[], %s, %s,"
        " %s, %s, %s, %s, %s, %s FROM accounts a WHERE a.number = %s AND NOT a.deleted RETURNING uuid",
        [uuid, row["direction"], row["dialled"], row["billsec"], row["customer_debit"], row["carrier_cost"],
         row["margin"], row["hangup_cause"], row["reject_reason"], number],
    )  # fmt: skip


def test_cdr_tab_filters_totals_and_export_in_scope(admin: Browser, browser_for: Make, db_url: str) -> None:
    _create(admin, "5570000001", reseller=ACME, rate_group="acme-retail")
    _cdr(
        db_url, "5570000001", "call-a", billsec=60, customer_debit="0.50", carrier_cost="0.20", margin="0.30"
    )
    _cdr(db_url, "5570000001", "call-b", reject_reason="NO_SUFFICIENT_FUND", hangup_cause="CALL_REJECTED")
    page = admin.text(admin.get("/customers/5570000001/cdrs"))
    assert "2 calls, 1 answered, 60 s billed, customer debit 0.50 USD, carrier cost 0.20, margin 0.30" in page
    answered = admin.text(admin.get("/customers/5570000001/cdrs?answered=yes"))
    assert "1 call, 1 answered" in answered and "NO_SUFFICIENT_FUND" not in answered
    rejected = admin.text(admin.get("/customers/5570000001/cdrs?rejected=yes"))
    assert "1 call, 0 answered" in rejected and "NO_SUFFICIENT_FUND" in rejected
    for odd in ("since=yesterday", "until=9999-12-31", "since=2026-13-01"):
        bad = admin.get(f"/customers/5570000001/cdrs?{odd}")
        assert bad.status_code == 422 and "expected a date" in admin.text(bad), odd
    export = admin.get("/customers/5570000001/cdrs.csv?answered=yes").get_data(as_text=True).splitlines()
    assert len(export) == 2 and "carrier_cost" in export[0] and "call-a" in export[1]
    # the reseller sees its customer's calls with its own cost, never the carrier's
    acme = browser_for(ACME, RESELLER_PASSWORD)
    mine = acme.text(acme.get("/customers/5570000001/cdrs"))
    assert "2 calls, 1 answered" in mine and "margin" not in mine.lower() and "carrier" not in mine.lower()
    header = acme.get("/customers/5570000001/cdrs.csv").get_data(as_text=True).splitlines()[0]
    assert "carrier_cost" not in header and "reseller_cost" in header
    other = browser_for(ACME_SUB, RESELLER_PASSWORD)
    assert other.get("/customers/5570000001/cdrs").status_code == 404
    assert other.get("/customers/5570000001/cdrs.csv").status_code == 404


def test_statement_and_emails_tabs(admin: Browser, db_url: str) -> None:
    _create(admin, "5571000001")
    admin.get("/customers/5571000001/refills")
    admin.post("/customers/5571000001/money/refills", {"amount": "3.00", "reference": "R-571"})
    admin.get("/customers/5571000001/alert-threshold")
    response = admin.post(
        "/customers/5571000001/single/alert-threshold", {"notify_enabled": "yes", "notify_balance_below": "5"}
    )
    assert response.status_code == 303
    statement = admin.text(admin.get("/customers/5571000001/charges"))
    assert "Opening balance" in statement and "R-571" in statement and "closing 3.00 USD" in statement
    emails = admin.text(admin.get("/customers/5571000001/emails"))
    assert "Low balance on account 5571000001" in emails


def test_refill_report_across_accounts_in_scope(admin: Browser, browser_for: Make) -> None:
    _create(admin, "5572000001")
    _create(admin, "5572000002", reseller=ACME, rate_group="acme-retail")
    for number, amount in (("5572000001", "4.00"), ("5572000002", "6.00")):
        admin.get(f"/customers/{number}/refills")
        admin.post(f"/customers/{number}/money/refills", {"amount": amount, "reference": f"RR-{number}"})
    report = admin.text(admin.get("/refills?account=5572000001"))
    assert "1 refill: 4.00 USD" in report and "RR-5572000001" in report and "RR-5572000002" not in report
    acme = browser_for(ACME, RESELLER_PASSWORD)
    mine = acme.text(acme.get("/refills"))
    assert "RR-5572000002" in mine and "RR-5572000001" not in mine
    assert acme.get("/refills?since=soon").status_code == 422


def test_a_reseller_creates_a_customer_in_its_own_subtree(browser_for: Make, db_url: str) -> None:
    acme = browser_for(ACME, RESELLER_PASSWORD)
    created = _create(acme, "5573000001", rate_group="acme-retail")
    assert created.status_code == 200, acme.text(created)
    owner = query(db_url, "SELECT r.number FROM accounts a JOIN accounts r ON r.id = a.reseller_id"
                          " WHERE a.number = '5573000001' AND NOT a.deleted", ())  # fmt: skip
    assert owner == [(ACME,)]
    actor = query(
        db_url, "SELECT actor FROM audit_log WHERE entity_key = '5573000001' ORDER BY id LIMIT 1", ()
    )
    assert actor == [(f"web:reseller:{ACME}",)]
    assert "5573000001" in acme.text(acme.get("/customers"))
    refused = _create(acme, "5573000002", rate_group="retail")  # the admin's rate group
    assert refused.status_code == 422 and 'id="f-rate_group-err"' in acme.text(refused)


def test_explain_shows_a_reseller_nothing_above_it(
    admin: Browser, browser_for: Make, web_config: Any
) -> None:
    from engine.sync import publish_once

    created = _create(
        admin, "5575000001", reseller=ACME_SUB, rate_group="sub-retail", create_sip_device="yes",
        sip_username="expl5575",
    )  # fmt: skip
    assert created.status_code == 200, admin.text(created)
    publish_once(web_config)
    path = "/customers/5575000001/explain?dest=442071234567&sip_user=expl5575"
    everything = admin.text(admin.get(path))
    assert f"reseller {ACME} active" in everything  # the admin sees every level
    sub = browser_for(ACME_SUB, RESELLER_PASSWORD)
    page = sub.text(sub.get(path))
    decision = page[page.index('<section class="decision') :]
    assert ACME not in decision  # the level above the signed-in reseller
    assert f"reseller {ACME_SUB} active" in decision  # its own level
    assert "not shown" in decision and "sofia/" not in decision
