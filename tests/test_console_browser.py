"""The web console in a real browser (Debian's chromium through Selenium, tests/support/browser.py), against a
real API server: sign-in, isolation, hostile strings, cancel, validate/submit, accessibility (axe-core) at
desktop and phone widths, and no Content-Security-Policy violation. Screenshots of each page go to the test's
tmp folder. The slow test runs the tiny job to SUCCEEDED through the console, its chart updating on the way.

Job names cannot carry markup (the spec's name pattern refuses it), so the hostile values travel where users
can put them: the system prompt (shown in the job's spec), training records (the preflight sample) and spec
keys (echoed in error messages)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.browser import DESKTOP, PHONE, Page, browser_session, require_browser
from tests.support.config import REPO
from tests.support.live import Server, api_in_thread
from tests.test_e2e import quick_spec
from tuneplane.client import Client
from tuneplane.spec import load_spec

HOSTILE = '<script>window.__pwned=1</script>"><img src=x onerror="window.__pwned=2">'


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API (SQLite) without its reconciler: submitted jobs stay PENDING, so pages are stable."""
    with api_in_thread(tmp_path_factory.mktemp("console-home")) as url:
        yield url


@pytest.fixture(scope="module")
def browser(api_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    with browser_session(api_url, tmp_path_factory.mktemp("screenshots")) as page:
        yield page


@pytest.fixture
def page(browser: Page, tmp_path: Path) -> Page:
    browser.shots = tmp_path  # each test's screenshots in its own tmp folder
    browser.size(DESKTOP)
    browser.open()
    browser.driver.execute_script("sessionStorage.clear()")
    browser.csp_violations()  # start each test with an empty console log
    return browser


def tiny_spec(**data: object) -> dict:
    """jobs/tiny-cpu.yaml with absolute paths (the console sends specs as they are), `data` fields replaced."""
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml").to_dict()
    spec["data"].update(data)
    return spec


def submit(url: str, spec: dict, token: str = "tok-alpha") -> dict:
    with Client(url, token=token) as client:
        return client.submit(spec)


def test_sign_in_keeps_the_token_out_of_urls_and_cookies_and_sign_out_forgets_it(page: Page) -> None:
    page.sign_in("not-a-token")
    # an unknown token is refused and the form comes back
    page.wait(lambda: "not known" in page.text(), what="refusal")
    page.sign_in("tok-alpha")
    page.wait(lambda: page.text("#who") == "alpha", what="team shown")
    driver = page.driver
    assert driver.execute_script("return sessionStorage.getItem('tuneplane.token')") == "tok-alpha"
    assert driver.execute_script("return document.cookie") == ""
    urls = [*driver.execute_script("return performance.getEntries().map(e => e.name)"), driver.current_url]
    assert urls and not any("tok-alpha" in u for u in urls), urls
    page.shot("signed-in")
    page.css("#signout").click()
    page.wait(lambda: page.css("#token"), what="sign-in form after sign-out")
    assert driver.execute_script("return sessionStorage.length") == 0


def test_every_page_passes_axe_at_desktop_and_phone_width_without_a_csp_violation(
    page: Page, api_url: str
) -> None:
    job = submit(api_url, tiny_spec())
    page.sign_in("tok-alpha")
    routes = {
        "jobs": ("#/jobs", "Team alpha"),
        "job": (f"#/jobs/{job['id']}", "Events"),
        "submit": ("#/submit", "Tuning spec"),
        "models": ("#/models", "How to load one"),
    }
    for width_height, label in ((DESKTOP, "desktop"), (PHONE, "phone")):
        page.size(width_height)
        for name, (route, marker) in routes.items():
            page.go(route)
            page.wait(lambda m=marker: m in page.text(), what=f"{name} page")
            if name == "submit":  # with the preflight report rendered
                page.css("#spec").clear()
                page.css("#spec").send_keys(yaml.safe_dump(tiny_spec()))
                page.css("#validate").click()
                page.wait(lambda: page.all("#report mark.trained"), timeout=60, what="preflight report")
            page.shot(f"{name}-{label}")
            assert page.axe() == [], (name, label)
            width = page.driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= width_height[0], f"{name} is {width}px wide at {label} width"
    assert page.csp_violations() == []


def test_hostile_strings_render_as_text(page: Page, api_url: str, tmp_path: Path) -> None:
    job = submit(api_url, tiny_spec(system_prompt=HOSTILE))
    page.sign_in("tok-alpha")
    page.go(f"#/jobs/{job['id']}")
    page.wait(lambda: HOSTILE in page.text("pre.spec"), what="the system prompt, as text")

    records = tmp_path / "hostile.jsonl"
    good = json.dumps({"instruction": HOSTILE, "input": "", "output": HOSTILE})
    records.write_text(f"{good}\n{good}\n{{not json\n{good}\n")  # line 3 is bad
    spec = tiny_spec(
        sources=[{"uri": str(records), "format": "alpaca"}], eval_sources=[], holdout_fraction=0.0
    )
    spec["eval"].update(zero_shot_sources=[], gate=None, lm_eval=None)
    spec["data"]["sources"][0].update(on_error="skip", max_error_fraction=0.5)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    page.go("#/submit")
    page.wait(lambda: page.css("#spec"), what="submit page")
    page.css("#spec-file").send_keys(str(tmp_path / "spec.yaml"))  # uploaded rather than pasted
    page.wait(lambda: "hostile.jsonl" in page.css("#spec").get_attribute("value"), what="the uploaded spec")
    page.css("#validate").click()
    page.wait(lambda: page.all("#report mark.trained"), timeout=60, what="preflight sample")
    assert HOSTILE in page.text("#report")
    assert f"{records}:3" in page.text("#report")  # the bad record, by uri:line
    assert any(HOSTILE in m.text for m in page.all("#report mark.trained"))  # the response is what trains

    bad = tiny_spec()
    bad[HOSTILE] = 1  # an unknown key is named in the error
    page.css("#spec").clear()
    page.css("#spec").send_keys(json.dumps(bad))
    page.css("#submit").click()
    page.wait(lambda: HOSTILE in page.text("#problems"), what="the problem naming the key")
    page.shot("hostile")
    assert page.driver.execute_script("return window.__pwned") is None
    assert not page.all("main img") and not page.all("main script")
    assert page.csp_violations() == []


def test_another_teams_job_is_not_found_by_url_and_admins_filter_by_team(page: Page, api_url: str) -> None:
    theirs = submit(api_url, tiny_spec(), token="tok-beta")
    page.sign_in("tok-alpha")
    page.go(f"#/jobs/{theirs['id']}")
    page.wait(lambda: "Job not found" in page.text(), what="not found")
    assert "beta" not in page.text() and theirs["id"] in page.text("[role=alert]")
    page.go("#/jobs")
    page.wait(lambda: "Team alpha" in page.text(), what="jobs")
    assert theirs["id"] not in page.text()
    page.shot("not-found")

    page.css("#signout").click()
    page.sign_in("tok-root")  # an admin of team alpha
    page.wait(lambda: theirs["id"] in page.text(), what="admin sees every team")
    page.css("#team-filter").send_keys("beta\n")
    page.wait(lambda: "Team beta" in page.text(), what="beta's quota")
    teams = [row.find_elements("css selector", "td")[1].text for row in page.all("tbody tr")]
    assert teams and set(teams) == {"beta"}, teams


def test_cancel_asks_first_and_the_job_page_follows_the_state(page: Page, api_url: str) -> None:
    job = submit(api_url, tiny_spec())
    page.sign_in("tok-alpha")
    page.go(f"#/jobs/{job['id']}")
    cancel = page.wait(
        lambda: next(b for b in page.all("button") if b.text == "Cancel…"), what="cancel button"
    )
    cancel.click()
    dialog = page.wait(lambda: page.css("dialog[open]"), what="confirmation")
    page.shot("cancel-dialog")
    next(b for b in dialog.find_elements("css selector", "button") if b.text == "Keep running").click()
    with Client(page.base_url, token="tok-alpha") as client:
        assert client.job(job["id"])["state"] == "PENDING"
        cancel.click()
        dialog = page.wait(lambda: page.css("dialog[open]"), what="confirmation")
        next(b for b in dialog.find_elements("css selector", "button") if b.text == "Cancel job").click()
        page.wait(lambda: page.css("main .state").text == "CANCELLED", what="CANCELLED on the page")
        assert client.job(job["id"])["state"] == "CANCELLED"
    page.wait(lambda: not any(b.text == "Cancel…" for b in page.all("button")), what="no cancel once ended")


def test_the_keyboard_alone_opens_and_dismisses_the_confirmation(page: Page, api_url: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    job = submit(api_url, tiny_spec())
    page.sign_in("tok-alpha")
    page.go(f"#/jobs/{job['id']}")
    page.wait(lambda: "Cancel…" in page.text(), what="cancel button")
    keys = ActionChains(page.driver)
    for _ in range(12):  # Tab from the page until the cancel button has the focus
        keys.send_keys(Keys.TAB).perform()
        if page.driver.switch_to.active_element.text == "Cancel…":
            break
    assert page.driver.switch_to.active_element.text == "Cancel…"
    keys.send_keys(Keys.ENTER).perform()
    page.wait(lambda: page.css("dialog[open]"), what="confirmation")
    assert page.driver.switch_to.active_element.text == "Keep running"  # the safe choice has the focus
    keys.send_keys(Keys.ESCAPE).perform()
    page.wait(lambda: not page.all("dialog[open]"), what="dismissed")
    with Client(api_url, token="tok-alpha") as client:
        assert client.job(job["id"])["state"] == "PENDING"


def test_the_jobs_list_updates_without_a_reload_and_filters_by_state(page: Page, api_url: str) -> None:
    job = submit(api_url, tiny_spec())
    page.sign_in("tok-alpha")
    page.wait(lambda: job["id"] in page.text(), what="the new job listed")
    with Client(api_url, token="tok-alpha") as client:
        client.cancel(job["id"])  # elsewhere: the CLI, another tab

    def row_state() -> str:
        row = next(r for r in page.all("tbody tr") if job["id"] in r.text)
        return str(row.find_elements("css selector", "td")[2].text)

    page.wait(lambda: row_state() == "CANCELLED", what="the row to follow")
    from selenium.webdriver.support.select import Select

    Select(page.css("#state-filter")).select_by_value("PENDING")
    page.wait(lambda: job["id"] not in page.text(), what="the filter")
    states = {r.find_elements("css selector", "td")[2].text for r in page.all("tbody tr")}
    assert states <= {"PENDING"}, states


def test_submit_again_prefills_the_spec_and_submitting_opens_the_new_job(page: Page, api_url: str) -> None:
    first = submit(api_url, tiny_spec(system_prompt="Answer briefly."))
    page.sign_in("tok-alpha")
    page.go(f"#/jobs/{first['id']}")
    page.wait(lambda: next(b for b in page.all("button") if b.text == "Submit again"), what="button").click()
    editor = page.wait(lambda: page.css("#spec"), what="submit page")
    assert yaml.safe_load(editor.get_attribute("value"))["data"]["system_prompt"] == "Answer briefly."

    bad = tiny_spec(system_prompt="Answer briefly.")
    bad["hyperparameters"]["learning_rate"] = -1
    editor.clear()
    editor.send_keys(yaml.safe_dump(bad))
    page.css("#submit").click()
    page.wait(lambda: "hyperparameters.learning_rate" in page.text("#problems"), what="the field at fault")
    editor.clear()
    editor.send_keys(yaml.safe_dump(tiny_spec(system_prompt="Answer briefly.")))
    page.css("#submit").click()
    page.wait(lambda: "#/jobs/tiny-cpu-" in page.driver.current_url, what="the new job's page")
    assert page.driver.current_url.rsplit("/", 1)[-1] != first["id"]


def test_headers_keep_team_data_out_of_caches_and_scripts_to_this_origin(api_url: str) -> None:
    with httpx.Client(base_url=api_url) as http:
        page = http.get("/console/")
        assert page.status_code == 200 and 'src="js/app.js"' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        vendor = http.get("/console/vendor/uplot-1.6.32/uPlot.esm.js")
        assert vendor.status_code == 200 and vendor.headers["cache-control"].startswith("public")
        jobs = http.get("/v1/jobs", headers={"Authorization": "Bearer tok-alpha"})
        assert jobs.status_code == 200 and jobs.headers["cache-control"] == "no-store"
        assert http.get("/v1/jobs").headers["cache-control"] == "no-store"  # errors too
        assert http.get("/", follow_redirects=False).headers["location"] == "/console/"
        assert http.get("/console/js/missing.js").headers["cache-control"] == "no-store"
        assert http.get("/console/js/app.js").headers["cache-control"] == "no-cache"  # never a stale module
    assert "<script>" not in (REPO / "platform/tuneplane/console/index.html").read_text().split("</head>")[1]


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("TUNEPLANE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium chromium-driver"):
        require_browser()
    monkeypatch.delenv("TUNEPLANE_REQUIRE_BROWSER")
    with pytest.raises(pytest.skip.Exception, match="install with"):
        require_browser()


@pytest.mark.slow
def test_the_tiny_job_runs_to_succeeded_with_its_chart_updating_and_its_model_listed(
    server: Server, tmp_path: Path, tiny_dir: Path
) -> None:
    """A real server (local backend, Ray) runs the tiny job the console submitted; the page follows it live."""
    require_browser()
    with browser_session(server.url, tmp_path) as page:
        page.sign_in("tok-alpha")
        page.go("#/submit")
        page.wait(lambda: page.css("#spec"), what="submit page")
        spec = yaml.safe_load(quick_spec(tmp_path, tiny_dir, max_steps=40).read_text())
        parity = tiny_spec()["eval"]["zero_shot_sources"][0]  # one zero-shot task, for the before/after table
        spec["eval"].update(zero_shot_sources=[parity], max_examples=12)
        page.css("#spec").send_keys(yaml.safe_dump(spec))
        page.css("#submit").click()
        page.wait(lambda: "#/jobs/" in page.driver.current_url, what="the job page")
        job_id = page.driver.current_url.rsplit("/", 1)[-1]

        def loss_points() -> int:
            chart = page.all('figure[data-chart="Loss"]')
            return int(chart[0].get_attribute("data-points") or 0) if chart else 0

        first = page.wait(loss_points, timeout=300, what="the first loss points")
        page.shot("job-running")
        page.wait(lambda: loss_points() > first, timeout=300, what="the chart to update")
        page.wait(lambda: page.css("main .state").text == "SUCCEEDED", timeout=400, what="SUCCEEDED")
        uri = page.wait(lambda: page.css(".model-uri").text, timeout=60, what="the model URI")
        assert uri.startswith("models:/alpha.e2e-adapter/")
        assert page.css("progress").get_attribute("value") == "40"
        scores = page.wait(lambda: page.all("#zero-shot tbody tr"), what="the zero-shot table")
        table = [[td.text for td in row.find_elements("css selector", "td")] for row in scores]
        assert [row[0] for row in table] == ["parity-labeled-eval", "mean"]
        assert all(0 <= float(x) <= 1 for x in table[0][1:3]), table
        page.driver.execute_cdp_cmd(
            "Browser.grantPermissions",
            {"origin": server.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
        )
        next(b for b in page.all("button") if b.text == "Copy").click()
        page.wait(lambda: page.text("#status") == "Copied", what="copied")
        copied = page.driver.execute_async_script(
            "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done(String(e)));"
        )
        assert copied == uri
        page.shot("job-succeeded")
        page.go("#/models")
        page.wait(lambda: job_id in page.text(), what="the model listed")
        assert "alpha.e2e-adapter" in page.text()
        page.shot("models")
        assert page.axe() == [] and page.csp_violations() == []


def test_a_page_left_while_it_loads_never_replaces_the_next_one(page: Page, api_url: str) -> None:
    job = submit(api_url, tiny_spec())
    page.sign_in("tok-alpha")
    for _ in range(3):  # the job page starts loading, the models page is asked for before it is done
        page.driver.execute_script(
            "location.hash = arguments[0]; setTimeout(() => { location.hash = '#/models'; }, 0);",
            f"#/jobs/{job['id']}",
        )
        page.wait(lambda: "How to load one" in page.text(), what="the models page")
        page.driver.implicitly_wait(0)
        threading.Event().wait(3)  # several poll periods: a leftover job page would have redrawn by now
        assert "How to load one" in page.text() and job["id"] not in page.text("h1")
        assert len(page.all("dialog")) == 0  # the job page's confirmation went with it
        page.go("#/jobs")
        page.wait(lambda: "Team alpha" in page.text(), what="jobs")
