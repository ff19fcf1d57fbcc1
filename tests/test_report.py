"""The HTML report: rendered in a real headless Chromium, escaping, SVG/PNG figures, and size as runs grow.

Chromium and its driver come from Debian (packages chromium, chromium-driver), which
`.ci/run` installs. If the browser cannot start, these tests fail: they never skip.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
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
    # every seed of the run's config files: the demo's stages and each fine-tuning run's
    seeds = browser.find_element(By.ID, "seeds").text
    for s in ("world.seed=", "pretrain.seed=", "slick.seed=", "experiment.finetune.seed=",
              "experiment.mixtures.seed=", "surrogate.seed=", "protocol.seed=", "finetune/*/config.json"):
        assert s in seeds, (s, seeds)
    # the figures of a small run are SVG, by the marks rule
    formats = {f.get_attribute("data-format") for f in browser.find_elements(By.CSS_SELECTOR, "figure.fig")}
    assert formats == {"svg"}

    n_rows = len(json.loads(browser.execute_script("return document.getElementById('ex-data').textContent")))
    assert n_rows > 50  # more than one page
    page_label = lambda: browser.find_element(By.ID, "ex-page").text  # noqa: E731
    assert page_label().startswith(f"page 1 of {-(-n_rows // 50)}")

    # sorting: clicking a column orders the rows by it, a second click reverses the order
    def column(i):
        return [r.find_elements(By.TAG_NAME, "td")[i].text
                for r in browser.find_elements(By.CSS_SELECTOR, "#ex-table tbody tr")]

    def nums(i):  # a numeric column; rows without a value ("-") are drawn last in both orders
        return [float(v) for v in column(i) if v != "-"]

    def row_texts():
        return [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#ex-table tbody tr")]

    before = row_texts()
    all_p0 = sorted(r["p0"] for r in json.loads(browser.execute_script(
        "return document.getElementById('ex-data').textContent")) if r["p0"] is not None)
    assert all_p0[0] < all_p0[-1]  # the demo model knows some facts and not others
    browser.find_element(By.CSS_SELECTOR, '#ex-table th[data-k="p0"]').click()
    p0 = nums(4)
    assert p0 == sorted(p0) and p0[0] == pytest.approx(all_p0[0], abs=0.005)  # ascending from the smallest
    browser.find_element(By.CSS_SELECTOR, '#ex-table th[data-k="p0"]').click()  # again: descending
    p0_desc = nums(4)
    assert p0_desc == sorted(p0_desc, reverse=True) and p0_desc[0] == pytest.approx(all_p0[-1], abs=0.005)
    assert row_texts() != before
    browser.find_element(By.CSS_SELECTOR, '#ex-table th[data-k="question"]').click()
    questions = column(1)
    assert questions == sorted(questions) and row_texts() != before

    # paging: forward shows the next rows (still in order), back shows the first page again
    first, first_rows = column(1), row_texts()
    browser.find_element(By.ID, "ex-next").click()
    second, second_rows = column(1), row_texts()
    assert page_label().startswith("page 2 of") and second_rows and not set(second_rows) & set(first_rows)
    assert first[-1] <= second[0] and second == sorted(second)  # the next rows of the same order
    browser.find_element(By.ID, "ex-prev").click()
    assert page_label().startswith("page 1 of") and row_texts() == first_rows
    browser.find_element(By.ID, "ex-prev").click()  # no page before the first
    assert page_label().startswith("page 1 of") and row_texts() == first_rows

    # search filters the table, in the page
    n_all = page_label()
    box = browser.find_element(By.ID, "ex-search")
    box.send_keys("HighlyKnown")
    cats = set(column(3))
    assert cats == {"HighlyKnown"} and page_label() != n_all
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


def _bench_report_size():
    """bench/report_size.py, whose synthetic run has every section's files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report_size", ROOT / "bench" / "report_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _figures(html):
    import re

    return [m.groupdict() for m in re.finditer(
        r'<figure class="fig" data-fig="(?P<name>\w+)" data-format="(?P<fmt>\w+)" data-marks="(?P<marks>\d+)">', html)]


def test_dense_figures_are_png_small_ones_svg():
    from reports import figures as F

    rng = np.random.default_rng(0)
    few = {c: rng.integers(0, 50, 40).tolist() for c in F.CATEGORIES}
    many = {c: rng.integers(0, 50, 2000).tolist() for c in F.CATEGORIES}
    small, dense = F.exposure_by_category(few), F.exposure_by_category(many)
    assert 'data-format="svg"' in small and "<svg" in small and "data:image/png" not in small
    assert 'data-format="png"' in dense and "data:image/png;base64," in dense and "<svg" not in dense
    assert F.is_dense(F.DENSE_MARKS + 1) and not F.is_dense(F.DENSE_MARKS)
    # aggregates stay SVG whatever the run's size; per-relation bars turn PNG with many relations
    assert 'data-format="svg"' in F.p_correct_histograms(rng.random(50_000).tolist(), rng.random(50_000).tolist())
    bars = {f"R{i}": {"HighlyKnown": 3, "Unknown": 2} for i in range(F.DENSE_MARKS // 4 + 1)}
    assert 'data-format="png"' in F.category_bars(bars)


def test_report_size_does_not_grow_with_the_run(tmp_path, browser):
    """Synthetic runs with every section's files (bench/report_size.py): past the table cap the page stays
    the same size whatever N (the dense figures PNG, the others SVG), far under the issue's 20 MB for 100k
    examples; every seed of the run's config files is listed. (A small run's figures are all SVG: the demo's
    report, above.)"""
    from selenium.webdriver.common.by import By

    from reports.figures import DENSE_MARKS

    bench = _bench_report_size()
    sizes, figs = {}, {}
    for n in (3_000, 12_000):
        run = bench.synthetic_run(tmp_path / f"run{n}", n)
        path = build_report(run, max_table_rows=2000)
        html = path.read_text(encoding="utf-8")
        sizes[n], figs[n] = path.stat().st_size, _figures(html)
        for sec in ('id="knowledge"', 'id="finetuning"', 'id="surrogates"', "Against the ground truth"):
            assert sec in html, (n, sec)
    print({n: f"{b / 2 ** 20:.2f} MB" for n, b in sizes.items()})
    for n in (3_000, 12_000):
        assert len(figs[n]) >= 15, n
        dense = {f["name"] for f in figs[n] if f["fmt"] == "png"}
        assert {"exposure_by_category", "residuals"} <= dense, (n, dense)
        assert all(int(f["marks"]) > DENSE_MARKS for f in figs[n] if f["fmt"] == "png")
        assert all(int(f["marks"]) <= DENSE_MARKS for f in figs[n] if f["fmt"] == "svg")
    assert sizes[12_000] < 1.15 * sizes[3_000]  # 4x the examples, about the same page
    assert sizes[12_000] < 20 * 2 ** 20 * 12_000 / 100_000  # the bound, scaled to 12k examples
    html = (tmp_path / "run12000" / "report.html").read_text(encoding="utf-8")
    start = html.index('id="ex-data">') + len('id="ex-data">')
    rows = json.loads(html[start:html.index("</script>", start)])
    assert len(rows) == 2000
    assert {r["category"] for r in rows} == {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    # the PNG figures decode in the browser; the seeds of every stage are listed
    _open(browser, tmp_path / "run12000" / "report.html")
    assert _severe(browser) == []
    imgs = browser.find_elements(By.CSS_SELECTOR, 'figure.fig[data-format="png"] img')
    assert imgs and all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 100", i)
                        for i in imgs)
    seeds = browser.find_element(By.ID, "seeds").text
    for key, value in (("world.seed", 11), ("pretrain.seed", 12), ("slick.seed", 13), ("protocol.seed", 13),
                       ("mixtures.seed", 14), ("finetune.seed", 15), ("surrogate.seed", 16)):
        assert f"{key}={value}" in seeds, (key, seeds)
    assert "finetune/*/config.json" in seeds and "surrogates/config.json: config.seed=16" in seeds


def test_cli_report(quick_demo, tmp_path):
    from knowcat.cli import main

    run, _ = quick_demo
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 0
