"""The feature browser: a site rendered from constructed feature books (and from a smoke run's, where one is given),
checked in real headless Chromium driven by Selenium with Debian's chromedriver.

Without chromium the browser tests skip, unless `$DYNTRACK_REQUIRE_BROWSER` is set (`.ci/run` sets it): then they fail.
The smoke run's site is checked when `$DYNTRACK_SMOKE_RUN` names a reproduce output folder (`.ci/run` sets it after
`make figures PROFILE=smoke`), else `runs/ci-smoke` of this checkout when it exists.
"""
import json, os, shutil, tempfile
from pathlib import Path

import pytest

from dyntrack.features import FeatureBookError, load_feature_book, save_feature_book
from dyntrack.reproduce.browser import page_names, script_json, write_site

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
EVIL = "<script>window.__pwned = 1</script>"  # a token that must be shown as text, never run


def ctx(tokens, acts):
    return dict(tokens=tokens, acts=acts, at=max(range(len(acts)), key=acts.__getitem__))


def label(kind, category=None, strength=None):
    return dict(kind=kind, category=category, strength=strength)


def feature(method, latent, n_ckpt, kind="token", category="cat", cls=None, shared=False, matches=()):
    "A feature of a constructed book; its contexts hold the awkward token texts at every checkpoint."
    contexts = [[ctx(["the", EVIL, " & ", '"q\'', f"w{t}"], [0.0, 2.0, 0.5, 0.1, 1.0 + t]),
                 ctx(["\n", f"x{latent}"], [0.3, 0.9])] for t in range(1 if shared else n_ckpt)]
    return dict(id=f"{method}/{latent}", latent=latent, label=label(kind, category, 0.5 if category else None),
                labels=None if shared else [label(kind, category, 0.1 * t) for t in range(n_ckpt)], **{"class": cls},
                formation_step=None if shared else 10, contexts=contexts,
                series={"drift": [0.1 * t if t else None for t in range(n_ckpt)]}, scalars={"pattern": "<b>x</b>"},
                matches=list(matches))


def books():
    "Two methods' books: SAE-Track with three checkpoints, crosscoding with one shared code over two."
    ckpts = [dict(step=s, tokens_seen=512 * s) for s in (0, 10, 100)]
    sae = dict(method="sae_track", notebook="11_sae_track", site="resid_pre block 1", checkpoints=ckpts,
               features=[feature("sae_track", i, 3, category=EVIL if i == 0 else f"c{i % 3}", cls=("emerging", "maintained")[i % 2],
                                 matches=[dict(id="crosscoding/0", score=0.8)] if i == 1 else ())
                         for i in range(6)])
    cc = dict(method="crosscoding", notebook="12_crosscoding", site="resid_pre block 1", checkpoints=ckpts[1:],
              features=[feature("crosscoding", i, 2, kind="concept", category="category=animal", cls="maintained", shared=True)
                        for i in range(3)])
    return sae, cc


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for book in books():
        (run / book["notebook"]).mkdir()
        save_feature_book(run / book["notebook"] / "feature_book.json", book)
    return write_site(run)


def test_site_files_and_escaping(site):
    root = site.index.parent
    assert site.n_features == site.n_pages == 9 and site.notes == []
    assert sorted(p.name for p in (root / "features").iterdir())[:2] == ["crosscoding-0.html", "crosscoding-1.html"]
    page = (root / "features" / "sae_track-0.html").read_text()
    assert EVIL not in page and "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "&quot;q&#x27;" in page and 'href="crosscoding-0.html"' not in page  # feature 0 has no match; feature 1 has
    assert 'href="crosscoding-0.html"' in (root / "features" / "sae_track-1.html").read_text()
    assert 'href="sae_track-1.html"' in (root / "features" / "crosscoding-0.html").read_text()  # and the other way
    index = (root / "index.html").read_text()
    data = index.split('id="features-data">')[1].split("</script>")[0]
    assert "<" not in data and json.loads(data)[0]["category"] == EVIL  # the JSON cannot close its element
    assert "http://" not in index.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in index  # no CDN


def test_script_json_escapes_line_separators():
    s = script_json(["\u2028\u2029</script>&"])
    assert s == '["\\u2028\\u2029\\u003c/script\\u003e\\u0026"]' and json.loads(s) == ["\u2028\u2029</script>&"]


def test_size_budget_trims_and_says_so(tmp_path):
    sae, cc = books()
    sae["features"] = [dict(feature("sae_track", i, 3), contexts=[[ctx([f"t{j}" for j in range(10)], [float(j) for j in range(10)])] * 8] * 3)
                       for i in range(40)]
    (tmp_path / "11_sae_track").mkdir()
    save_feature_book(tmp_path / "11_sae_track" / "feature_book.json", sae)
    full = write_site(tmp_path, tmp_path / "full")
    half = write_site(tmp_path, tmp_path / "half", budget_mb=full.size_mb * 0.5)
    assert full.n_contexts == 8 and half.n_contexts < 8 and half.size_mb <= full.size_mb * 0.5 and half.n_pages == 40
    tiny = write_site(tmp_path, tmp_path / "tiny", budget_mb=0.08)
    assert tiny.n_contexts == 1 and 0 < tiny.n_pages < 40 and tiny.size_mb <= 0.08
    assert f"{40 - tiny.n_pages} of 40 features have no page" in (tmp_path / "tiny" / "index.html").read_text()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no notebook folder holds a feature_book.json"):
        write_site(tmp_path)
    sae, _ = books()
    (tmp_path / "11_sae_track").mkdir()
    bad = json.loads(json.dumps(sae))
    bad["features"][2]["contexts"][1][0]["tokens"][1] = 7
    (tmp_path / "11_sae_track" / "feature_book.json").write_text(json.dumps(bad))
    with pytest.raises(FeatureBookError, match=r"11_sae_track/feature_book.json: features\[2\].contexts\[1\]\[0\].tokens must be"):
        write_site(tmp_path)
    with pytest.raises(ValueError, match="budget_mb must be > 0"):
        write_site(tmp_path, budget_mb=0)


# --- in a real browser -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        why = "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("DYNTRACK_REQUIRE_BROWSER"): pytest.fail(f"{why}, and $DYNTRACK_REQUIRE_BROWSER says they must be (CI)")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="dyntrack-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]: options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path: Path):
    "Load `path` from disk; return the console messages of level SEVERE it logged."
    driver.get(path.resolve().as_uri())
    return [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]


def rows(driver):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")


def check_index(driver, site):
    "The index loads without console errors, lists every feature, and the filter box narrows the list to what matches."
    from selenium.webdriver.common.by import By
    assert open_page(driver, site.index) == []
    assert len(rows(driver)) == site.n_features
    box = driver.find_element(By.ID, "filter")
    box.send_keys("crosscoding")
    narrowed = rows(driver)
    assert 0 < len(narrowed) < site.n_features
    assert all(r.find_elements(By.TAG_NAME, "td")[1].text == "crosscoding" for r in narrowed)
    box.clear(); box.send_keys("no feature is called this")
    assert rows(driver) == [] and driver.find_element(By.ID, "count").text == f"0 of {site.n_features} features"
    return narrowed


def check_feature_page(driver, page: Path, f: dict):
    "`f`'s page loads without console errors and shows its contexts for every checkpoint (one section for a shared code)."
    from selenium.webdriver.common.by import By
    assert open_page(driver, page) == []
    sections = driver.find_elements(By.CSS_SELECTOR, "section.checkpoint")
    assert len(sections) == len(f["contexts"]), (page, len(sections))
    for s, ctxs in zip(sections, f["contexts"]):
        assert len(s.find_elements(By.CSS_SELECTOR, "div.context")) == min(len(ctxs), 8), page
    return sections


def test_index_in_chromium(browser, site):
    from selenium.webdriver.common.by import By
    check_index(browser, site)
    browser.find_element(By.ID, "filter").clear()
    browser.find_element(By.ID, "method").send_keys("sae_track")  # the select narrows too
    assert len(rows(browser)) == 6
    first = rows(browser)[0].find_elements(By.TAG_NAME, "td")
    assert first[3].text == EVIL and browser.execute_script("return window.__pwned") is None  # text, not a script
    ids = lambda: [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows(browser)]
    header = browser.find_element(By.CSS_SELECTOR, '#features th[data-key="id"]')
    header.click(); assert ids() == sorted(ids())
    header.click(); assert ids() == sorted(ids(), reverse=True)  # a second click turns the order


def test_feature_page_in_chromium(browser, site):
    from selenium.webdriver.common.by import By
    root = site.index.parent / "features"
    sae, cc = books()
    sections = check_feature_page(browser, root / "sae_track-0.html", sae["features"][0])
    assert [s.get_attribute("data-step") for s in sections] == ["0", "10", "100"]
    for s in sections:
        contexts = s.find_elements(By.CSS_SELECTOR, "div.context")
        assert len(contexts) == 2 and EVIL in contexts[0].text  # the token holding <script> is shown as its text
    assert browser.execute_script("return window.__pwned") is None
    assert browser.find_elements(By.CSS_SELECTOR, ".chart svg circle")  # the drift series is drawn
    assert len(check_feature_page(browser, root / "crosscoding-1.html", cc["features"][1])) == 1  # one code for both checkpoints
    browser.find_element(By.LINK_TEXT, "← all features").click()
    assert len(rows(browser)) == site.n_features


def smoke_run() -> Path | None:
    run = Path(os.environ.get("DYNTRACK_SMOKE_RUN", REPO / "runs" / "ci-smoke"))
    return run if run.is_dir() and list(run.glob("*/feature_book.json")) else None


@pytest.mark.skipif(smoke_run() is None, reason="no smoke run with feature books: set DYNTRACK_SMOKE_RUN to a "
                    "`make figures PROFILE=smoke` output folder (.ci/run does)")
def test_smoke_run_site_in_chromium(browser, tmp_path):
    run = smoke_run()
    site = write_site(run, tmp_path / "site")
    assert site.n_pages == site.n_features > 0 and not any(n.startswith("Trimmed") for n in site.notes)  # far below the budget
    check_index(browser, site)
    books = [load_feature_book(p) for p in sorted(run.glob("*/feature_book.json"))]
    pages = page_names([f["id"] for b in books for f in b["features"]])
    for book in books:
        for f in book["features"][:3]:
            sections = check_feature_page(browser, tmp_path / "site" / "features" / pages[f["id"]], f)
            assert all(s.text for s in sections)
