"""attention.html in a real headless Chromium: hovering a token lights exactly its row of the head."""
import io
import os
import pathlib
import re

import numpy as np
import pytest

from headwise.explain.ascii import token_label
from headwise.explain.page import attention_html

CHROMIUM, CHROMEDRIVER = pathlib.Path("/usr/bin/chromium"), pathlib.Path("/usr/bin/chromedriver")
LABELS = ["a", " b", "</script><b>x", "\n", "&\""]  # short: the layout must not shift on hover
BLUE, ORANGE = (31, 119, 180), (230, 85, 13)
EXACT, ALPHA = 5e-5, 1 / 255  # shown numbers have 4 decimals; Chromium keeps alpha in 8 bits


def hand_made_patterns(layers=2, heads=2, tokens=5) -> np.ndarray:
    """[L, N, T, T] causal patterns, a different one in every head, rows summing to 1."""
    rng = np.random.default_rng(7)
    scores = rng.normal(scale=2.0, size=(layers, heads, tokens, tokens))
    scores = np.where(np.tril(np.ones((tokens, tokens), bool)), scores, -np.inf)
    patterns = np.exp(scores - scores.max(-1, keepdims=True))
    return patterns / patterns.sum(-1, keepdims=True)


def test_page_is_self_contained_and_labels_cannot_break_it(tmp_path):
    path = attention_html(hand_made_patterns(), LABELS, tmp_path / "attention.html")
    page = path.read_text(encoding="utf-8")
    assert page.count("</script>") == 2 and page.count("<script") == 2  # only the page's own
    assert "<b>" not in page
    assert not re.search(r"https?://|\bsrc=|<link|@import|url\(", page)  # nothing fetched


def test_bad_input_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="one label per token"):
        attention_html(hand_made_patterns(), LABELS[:3], tmp_path / "a.html")
    with pytest.raises(ValueError, match=r"\[layers, heads, T, T\]"):
        attention_html(hand_made_patterns()[0], LABELS, tmp_path / "a.html")
    with pytest.raises(ValueError, match="nothing to draw"):
        attention_html(np.zeros((2, 2, 0, 0)), [], tmp_path / "a.html")
    with pytest.raises(ValueError, match="NaN"):
        attention_html(hand_made_patterns() * np.nan, LABELS, tmp_path / "a.html")


def test_tokens_show_whitespace():
    assert [token_label(s) for s in [" a", "\n", "\t", "\x00", ""]] == \
        ["\u2423a", "\u23ce", "\u21e5", "\\x00", "\u2205"]


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver: "
                    "apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]'")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,1000", "--force-device-scale-factor=1"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def pick(driver, layer: int, head: int):
    from selenium.webdriver.support.ui import Select
    Select(driver.find_element("id", "layer")).select_by_value(str(layer))
    Select(driver.find_element("id", "head")).select_by_value(str(head))


def hover(driver, css: str):
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(driver).move_to_element(driver.find_element("css selector", css)).perform()


def painted(elements, rgb) -> np.ndarray:
    """Each element's weight as its inline background says it: the alpha of rgba(rgb, alpha)."""
    weights = []
    for element in elements:
        style = element.get_attribute("style") or ""
        match = re.search(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", style)
        assert match is None or tuple(map(int, match.groups()[:3])) == rgb, style
        weights.append(0.0 if match is None else float(match.group(4) or 1))  # rgb(): alpha 1
    return np.array(weights)


def check_dom(driver, patterns, layer, head, t):
    """The hovered token's row lights the 'to' strip and row t of the heat map, its column the
    'from' strip; shown numbers equal the pattern to 4 decimals, background alphas to Chromium's 8 bits."""
    row, column = patterns[layer, head, t], patterns[layer, head, :, t]
    to = driver.find_elements("css selector", "#to .tok")
    np.testing.assert_allclose([float(s.text.split("\n")[-1]) for s in to], row, atol=EXACT)
    np.testing.assert_allclose(painted(to, BLUE), row, atol=ALPHA)
    np.testing.assert_allclose(painted(driver.find_elements("css selector", "#from .tok"),
                                       ORANGE), column, atol=ALPHA)
    lit = driver.find_elements("css selector", "#heat td.hl-row")
    assert [int(td.get_attribute("data-q")) for td in lit] == [t] * len(row)
    np.testing.assert_allclose([float(td.get_attribute("data-w")) for td in lit], row, atol=EXACT)
    np.testing.assert_allclose(painted(lit, BLUE), row, atol=ALPHA)
    assert [int(td.get_attribute("data-k")) for td in
            driver.find_elements("css selector", "#heat td.hl-col")] == [t] * len(row)


def dominant_colour(image: np.ndarray, element) -> np.ndarray:
    """The most common RGB inside the element, 3 px in from its edges (the background, not
    the text over it nor the highlight's inset border)."""
    r = element.rect
    x0, y0 = int(r["x"]) + 3, int(r["y"]) + 3
    box = image[y0:int(r["y"] + r["height"]) - 3, x0:int(r["x"] + r["width"]) - 3, :3]
    colours, counts = np.unique(box.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()].astype(float)


def blended(rgb, w) -> np.ndarray:
    """What rgba(rgb, w) over the white page looks like."""
    return 255 * (1 - w) + np.array(rgb, float) * w


def screenshot(driver) -> np.ndarray:
    from PIL import Image  # matplotlib's own dependency
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))


def check_screenshot(driver, patterns, layer, head, t, before: np.ndarray):
    """On screen: before the hover no token is coloured; after it, the row's tokens and heat-map
    cells have their weight's colour, and a masked (future) cell stays white."""
    image = screenshot(driver)
    tokens = driver.find_elements("css selector", "#to .tok")
    cells = driver.find_elements("css selector", f"#heat td[data-q='{t}']")
    for k, w in enumerate(patterns[layer, head, t]):
        assert np.all(dominant_colour(before, tokens[k]) == 255), f"token {k} coloured early"
        for element in (tokens[k], cells[k]):
            np.testing.assert_allclose(dominant_colour(image, element), blended(BLUE, w), atol=3)
            if k > t:
                assert np.all(dominant_colour(image, element) == 255), f"masked key {k} coloured"
    assert np.abs(blended(BLUE, patterns[layer, head, t].max()) - 255).max() > 20  # not faint


def test_hovering_a_token_shows_its_row_and_column(browser, tmp_path):
    patterns, (layer, head, t) = hand_made_patterns(), (1, 0, 3)
    assert all(np.abs(patterns[layer, head] - patterns[l, n]).max() > 0.05
               for l in range(2) for n in range(2) if (l, n) != (layer, head))
    browser.get(attention_html(patterns, LABELS, tmp_path / "attention.html").as_uri())
    assert browser.find_elements("css selector", "b") == []  # the '<b>' label stayed text
    assert [s.find_element("css selector", ".txt").text for s in
            browser.find_elements("css selector", "#to .tok")] == [token_label(s) for s in LABELS]
    pick(browser, layer, head)
    before = screenshot(browser)
    hover(browser, f"#to .tok[data-i='{t}']")
    check_dom(browser, patterns, layer, head, t)
    check_screenshot(browser, patterns, layer, head, t, before)
    pathlib.Path(os.environ.get("HEADWISE_SCREENSHOT", tmp_path / "page.png")).write_bytes(
        browser.get_screenshot_as_png())
    pick(browser, 0, 1)  # the pickers repaint the same hovered token with another head
    check_dom(browser, patterns, 0, 1, t)
    for other in range(len(LABELS)):  # the numbers appearing must not move tokens under the mouse
        hover(browser, f"#from .tok[data-i='{other}']")
        check_dom(browser, patterns, 0, 1, other)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
