"""The dashboard (``/ui``) in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) against a real cortex and neuron with tiny
models: the page renders the fleet, updates when a model loads, and its buttons work with
the admin token and are refused with an API key. Screenshots go to .cache/screenshots for
review. Without Chromium (scripts/dev.sh installs it where apt can) the test skips."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cortex.conftest import _start_neurons, cpu_models
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, console_script, wait_for

ADMIN_TOKEN = "dashboard-admin-token-0123456789abcdef"
SCREENSHOTS = Path(__file__).resolve().parents[2] / ".cache" / "screenshots"
ROOT = Path(__file__).resolve().parents[2]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def browser_binaries() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    found = browser_binaries()
    if found is None:
        pytest.skip("no chromium / chromedriver here (apt install chromium chromium-driver)")
    chromium, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver)
    drv = webdriver.Chrome(options=options, service=service)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def gated(
    tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path
) -> Iterator[tuple[str, str, Daemon]]:
    """A cortex with an admin token and one API key, in front of one neuron."""
    work = tmp_path_factory.mktemp("dashboard")
    neurons = _start_neurons(
        work, fleet_cache, {"box": "keepalive_s = 0.5\n[cpu]\nmemory_mb = 200\n"}
    )
    extra = f'admin_token = "{ADMIN_TOKEN}"\n[auth]\nkeys_file = "keys.toml"\n'
    models = cpu_models("helexa/tiny-a", "helexa/tiny-b")
    cortex, base, _metrics = start_cortex(
        work, {"box": neurons["box"][1]}, models, extra=extra, name="dash"
    )
    added = subprocess.run(
        [console_script("cortex"), "keys", "add", "viewer", "--config", str(work / "dash.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    bearer = {"authorization": f"Bearer {key}"}
    wait_for(  # the running cortex picks the new key up by itself
        "the new key",
        lambda: httpx.get(f"{base}/admin/dashboard", headers=bearer).status_code == 200,
    )
    yield base, key, cortex
    cortex.stop()
    for daemon, _ in neurons.values():
        daemon.stop()


def shoot(driver: object, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"dashboard-{name}.png"))  # type: ignore[attr-defined]


def until(driver: object, what: str, check, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    """Wait for ``check``; the page redraws every 2 s, so an element read in between may be
    gone (stale): that is tried again, not a failure."""
    try:
        WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.2,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(lambda d: check(d))
    except TimeoutException:
        shoot(driver, f"failed-{what.replace(' ', '-')}")
        raise AssertionError(f"the page never showed {what}") from None


def use_key(driver: object, secret: str) -> None:
    box = driver.find_element(By.ID, "key")  # type: ignore[attr-defined]
    box.clear()
    box.send_keys(secret)
    driver.find_element(By.ID, "use-key").click()  # type: ignore[attr-defined]


def press(driver: object, model: str, action: str) -> None:
    """Click a model's button (found afresh: the row may have been redrawn)."""

    def attempt(d) -> bool:  # type: ignore[no-untyped-def]
        button = f'button[data-action="{action}"]'
        model_row(d, model).find_element(By.CSS_SELECTOR, button).click()
        return True

    until(driver, f"the {action} button of {model}", attempt)


def model_row(driver: object, model: str) -> object:
    return driver.find_element(By.CSS_SELECTOR, f'tr.model-row[data-model="{model}"]')  # type: ignore[attr-defined]


def test_the_dashboard_shows_the_fleet_and_its_buttons_obey_the_keys(
    browser: object, gated: tuple[str, str, Daemon]
) -> None:
    base, key, _cortex = gated
    driver = browser
    # The page itself is open (it holds no data); its data route wants a key.
    page = httpx.get(f"{base}/ui")
    assert page.status_code == 200 and "helexa cortex" in page.text
    assert "http" not in page.text.split("<script>")[1].replace("http-equiv", "")  # offline
    assert httpx.get(f"{base}/admin/dashboard").status_code == 401

    driver.get(f"{base}/ui")  # type: ignore[attr-defined]
    until(
        driver,
        "that a key is needed",
        lambda d: "key needed" in d.find_element(By.ID, "fleet-status").text,
    )

    # An API key reads it: the neuron, its CPU budget, the catalogue.
    use_key(driver, key)
    until(driver, "the fleet", lambda d: d.find_element(By.ID, "fleet-status").text == "ok")

    def shows_the_neuron(d) -> bool:  # type: ignore[no-untyped-def]
        neuron = d.find_element(By.CSS_SELECTOR, '.neuron[data-name="box"]')
        return (
            neuron.get_attribute("data-state") == "up"
            and "CPU budget" in neuron.text
            and "of 200 MB used" in neuron.text
            and model_row(d, "helexa/tiny-a").get_attribute("data-loaded") == "false"
        )

    until(driver, "the neuron and its CPU budget", shows_the_neuron)
    shoot(driver, "1-fleet")

    # ... but its buttons are refused, and say why.
    press(driver, "helexa/tiny-a", "load")
    until(
        driver,
        "the refusal, and why",
        lambda d: "403" in (text := d.find_element(By.ID, "message").text) and "admin" in text,
    )
    assert httpx.get(f"{base}/v1/models", headers={"authorization": f"Bearer {key}"}).json()
    shoot(driver, "2-refused")

    # The admin token loads, pins and unloads; the page follows each change.
    use_key(driver, ADMIN_TOKEN)
    until(driver, "the fleet again", lambda d: d.find_element(By.ID, "fleet-status").text == "ok")
    press(driver, "helexa/tiny-a", "load")
    until(
        driver,
        "the model loaded",
        lambda d: model_row(d, "helexa/tiny-a").get_attribute("data-loaded") == "true",
        timeout=60,
    )
    until(
        driver,
        "the model in the CPU bar",
        lambda d: (
            "helexa/tiny-a" in d.find_element(By.CSS_SELECTOR, '.neuron[data-name="box"]').text
        ),
    )
    # A request through cortex shows in the recent requests, with its figures.
    chat = {
        "model": "helexa/tiny-a",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    sent = httpx.post(
        f"{base}/v1/chat/completions",
        json=chat,
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert sent.status_code == 200, sent.text
    until(
        driver,
        "the request",
        lambda d: "/v1/chat/completions" in d.find_element(By.ID, "recent").text,
    )
    until(driver, "the key's name", lambda d: "viewer" in d.find_element(By.ID, "recent").text)
    press(driver, "helexa/tiny-a", "pin")
    until(driver, "the pin", lambda d: "pinned" in model_row(d, "helexa/tiny-a").text)
    shoot(driver, "3-loaded-and-pinned")

    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    unknown = httpx.post(
        f"{base}/admin/models/pin", json={"model_id": "nobody/nothing"}, headers=admin
    )
    assert unknown.status_code == 404, unknown.text
    malformed = httpx.post(
        f"{base}/admin/models/pin", json={"model_id": 3, "pinned": "x"}, headers=admin
    )
    assert malformed.status_code == 400, malformed.text
    hostile = httpx.post(
        f"{base}/admin/models/pin", json={"model_id": "<img src=x onerror=alert(1)>"}, headers=admin
    )
    assert hostile.status_code in (400, 404)  # never rendered as markup: the page uses text nodes
    dashboard = httpx.get(
        f"{base}/admin/dashboard", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ).json()
    entry = next(m for m in dashboard["models"] if m["id"] == "helexa/tiny-a")
    assert entry["pinned"] and entry["last_minutes"]["requests"] >= 1

    press(driver, "helexa/tiny-a", "unload")
    until(
        driver,
        "the model unloaded",
        lambda d: model_row(d, "helexa/tiny-a").get_attribute("data-loaded") == "false",
        timeout=60,
    )
    shoot(driver, "4-unloaded")
