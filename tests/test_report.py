"""The HTML report: rendered in a real headless Chromium, escaping, and size at 100k examples.

Chromium and its driver come from Debian (packages chromium, chromium-driver), which
`.ci/run` installs. If the browser cannot start, these tests fail: they never skip.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from reports import build_report

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KNOWCAT_TEST_ARTIFACTS") or ROOT / "test-artifacts")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1280,2000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)  # fails loudly if it cannot start
    yield driver
    driver.quit()


def _open(driver, path, timeout=120):
    """Open a file and wait until the page has fully loaded (scripts run, images decoded).

    `driver.get` may return while a large page is still loading on a busy machine, so the
    load is awaited explicitly; a page that never finishes loading fails the test.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(Path(path).as_uri())
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _severe(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_demo_report_in_headless_chromium(quick_demo, browser, tmp_path):
    from selenium.webdriver.common.by import By

    run, _ = quick_demo
    path = build_report(run, out=tmp_path / "report.html")
    _open(browser, path)
    assert _severe(browser) == []
    for sec in ("summary", "run", "knowledge", "finetuning", "surrogates"):
        el = browser.find_element(By.ID, sec)
        assert el.is_displayed() and el.text.strip(), sec
    assert "Against the ground truth" in browser.find_element(By.ID, "knowledge").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#ex-table tbody tr")
    assert 0 < len(rows) <= 50
    # search filters the table, sorting reorders it, both in the page
    n_all = browser.execute_script("return document.getElementById('ex-page').textContent")
    box = browser.find_element(By.ID, "ex-search")
    box.send_keys("HighlyKnown")
    cats = {r.find_elements(By.TAG_NAME, "td")[3].text for r in browser.find_elements(By.CSS_SELECTOR, "#ex-table tbody tr")}
    assert cats <= {"HighlyKnown"} and browser.execute_script("return document.getElementById('ex-page').textContent") != n_all
    assert len(browser.find_elements(By.CSS_SELECTOR, "#surrogates svg")) >= 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "#finetuning svg")) >= 1
    assert _severe(browser) == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(ARTIFACTS / "report_quick_demo.png"))
    assert (ARTIFACTS / "report_quick_demo.png").stat().st_size > 10_000


EVIL = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">',
        '</script><script>window.__pwned = 3</script>', '"><b>bold</b> & <i>x</i>']


def _categorized_run(tmp_path, n, evil=False):
    run = tmp_path / "run"
    (run / "categorize").mkdir(parents=True)
    cats = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
    with open(run / "categorized.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            q = EVIL[i % len(EVIL)] if evil else f"Where was person {i} born?"
            f.write(json.dumps({"id": f"x{i}", "relation": EVIL[1] if evil and i % 2 else f"P{i % 12}",
                                "question": q, "answers": [EVIL[(i + 1) % len(EVIL)] if evil else f"City {i % 997}"],
                                "split": "train", "category": cats[i % 4], "p_correct_greedy": (i % 11) / 10,
                                "p_correct_sampled": None if i % 4 < 2 else (i % 7) / 6,
                                "greedy_answers": [EVIL[0] if evil else f"City {i}"] * 10}) + "\n")
    (run / "categorize" / "config.json").write_text(json.dumps({"model": EVIL[0] if evil else "m", "data": "d",
                                                                "protocol": {"n_prompts": 10}}))
    return run


def test_html_and_script_in_data_are_escaped(tmp_path, browser):
    from selenium.webdriver.common.by import By

    run = _categorized_run(tmp_path, 40, evil=True)
    path = build_report(run)
    html = path.read_text()
    for s in EVIL:
        assert s not in html  # never verbatim in the page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html  # escaped where the template prints data
    _open(browser, path)
    assert browser.execute_script("return window.__pwned === undefined")
    assert _severe(browser) == []
    cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#ex-table tbody td")]
    assert EVIL[0] in cells and EVIL[2] in cells  # shown as text
    assert browser.find_elements(By.CSS_SELECTOR, "#ex-table b") == []  # no markup from the data


def test_report_of_100k_examples_stays_small(tmp_path):
    run = _categorized_run(tmp_path, 100_000)
    path = build_report(run)
    size = path.stat().st_size
    assert size < 20 * 2 ** 20
    data = path.read_text()
    start = data.index('id="ex-data">') + len('id="ex-data">')
    rows = json.loads(data[start:data.index("</script>", start)])
    assert len(rows) == 2000  # a stratified sample
    assert {r["category"] for r in rows} == {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    print(f"report of 100,000 examples: {size / 2 ** 20:.2f} MB")


def test_cli_report(quick_demo, tmp_path):
    from knowcat.cli import main

    run, _ = quick_demo
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 0
