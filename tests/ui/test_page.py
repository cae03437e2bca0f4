"""The page in a real browser: headless Chromium (selenium + the system chromedriver) against a
real ``lorita serve`` in the embedded mode (SQLite, the local broker, a worker child).

Screenshots of each page are saved under the test's temporary directory; their paths are
printed (``pytest -s`` shows them, and they are listed in the captured output on failure).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from cli.demo import create_key, running_service, service_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; "
        ".ci/run installs them)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@dataclass
class Service:
    url: str
    key_a: str
    key_b: str
    workdir: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("ui-service")
    env = service_env(workdir, OMP_NUM_THREADS="1")
    with running_service(workdir, env) as url:
        yield Service(url, create_key(env, workdir, "ui-a"), create_key(env, workdir, "ui-b"), workdir)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, shots: Path, name: str, full_page: bool = True) -> Path:
    """A screenshot of the whole page (the window grows to the page's height first)."""
    path = shots / f"{name}.png"
    size = driver.get_window_size()
    if full_page:
        driver.execute_script("window.scrollTo(0, 0)")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], min(max(int(height) + 40, 600), 6000))
    driver.save_screenshot(str(path))
    driver.set_window_size(size["width"], size["height"])
    print(f"screenshot: {path}")
    return path


def wait(driver: Any, condition: Callable[[Any], Any], timeout: float = 60.0, what: str = "") -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}: at {driver.current_url}"
        ) from None


def sign_in(driver: Any, url: str, key: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{url}/ui/jobs")
    wait(driver, lambda d: "/ui/login" in d.current_url, what="the sign-in page")
    driver.find_element(By.ID, "api_key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form[action='/ui/login'] button[type=submit]").click()
    # the path, not the URL's end: the sign-in page's own URL ends with "?next=/ui/jobs"
    wait(
        driver,
        lambda d: urlsplit(d.current_url).path == "/ui/jobs" and d.get_cookie("lorita_session"),
        what="the jobs page after signing in",
    )


def make_npz(path: Path, n_train: int = 400, n_test: int = 120, dim: int = 16, classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    centers = rng.uniform(0.2, 0.8, size=(classes, dim))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        x = np.clip(centers[y] + 0.12 * rng.normal(size=(n, dim)), 0.0, 1.0)
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def set_field(driver: Any, path: str, value: str) -> None:
    field = driver.find_element(By.ID, f"f-{path}")
    if field.tag_name == "select":
        Select(field).select_by_value(value)
    else:
        field.clear()
        field.send_keys(value)


def api(service: Service, key: str) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def job_id_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def watch_job_page(driver: Any, on_running: Callable[[], Any] | None = None) -> list[float]:
    """Progress values the job page shows until it renders the finished job's results;
    ``on_running`` is called once, the first time the bar is part-way."""
    seen: list[float] = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        try:
            value = float(driver.find_element(By.ID, "job-progress").get_attribute("value"))
            status = driver.find_element(By.ID, "job").get_attribute("data-status")
            finished = driver.find_element(By.ID, "job").get_attribute("data-finished")
        except Exception:  # the page is reloading
            time.sleep(0.1)
            continue
        if not seen or value != seen[-1]:
            seen.append(value)
            if on_running is not None and 0.0 < value < 1.0 and finished != "true":
                on_running()
                on_running = None
        if finished == "true":
            assert status == "succeeded", driver.find_element(By.ID, "job-progress-text").text
            return seen
        time.sleep(0.1)
    raise AssertionError(f"the job did not finish on the page; progress seen {seen}")


@pytest.fixture(scope="module")
def finished_job(
    service: Service, browser: Any, shots: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Tenant A signs in, uploads a dataset, submits a small job from the form and watches it."""
    driver = browser
    driver.delete_all_cookies()
    driver.get(f"{service.url}/")
    wait(driver, lambda d: "/ui/login" in d.current_url, what="/ to lead to the sign-in page")
    shot(driver, shots, "01-sign-in")
    sign_in(driver, service.url, service.key_a)
    shot(driver, shots, "02-jobs-empty")

    driver.get(f"{service.url}/ui/jobs/new")
    npz = make_npz(tmp_path_factory.mktemp("data") / "blobs.npz")
    driver.find_element(By.ID, "ud-file").send_keys(str(npz))
    driver.find_element(By.CSS_SELECTOR, "#upload-dataset button[type=submit]").click()
    result = driver.find_element(By.CSS_SELECTOR, "#upload-dataset .upload-result")
    wait(driver, lambda d: result.text.startswith("Uploaded"), what="the dataset upload")
    assert (
        float(driver.find_element(By.CSS_SELECTOR, "#upload-dataset progress").get_attribute("value")) == 1.0
    )
    chosen = Select(driver.find_element(By.ID, "f-dataset")).first_selected_option
    assert str(chosen.get_attribute("value")).startswith("upload:")

    # the form starts from examples/digits_fcn.json; make it small
    assert driver.find_element(By.ID, "f-name").get_attribute("value") == "digits-fcn-lorita"
    set_field(driver, "name", "ui-blobs")
    set_field(driver, "model.options", json.dumps({"depth": 2, "width": 32}))
    set_field(driver, "train.epochs", "0")  # first a mistake: shown next to the field
    set_field(driver, "train.factors", "2")
    set_field(driver, "compress.max_drop", "0.05")
    set_field(driver, "compress.max_evals", "8")
    set_field(driver, "finetune.epochs", "0")
    set_field(driver, "device", "cpu")
    pt2 = driver.find_element(By.CSS_SELECTOR, "[data-export=pt2]")
    if pt2.is_selected():
        pt2.click()
    driver.find_element(By.ID, "submit-job").click()
    error = driver.find_element(By.ID, "err-train.epochs")
    wait(driver, lambda d: error.is_displayed(), what="the error next to train.epochs")
    assert "greater than or equal to 1" in error.text or ">= 1" in error.text or "1" in error.text
    assert driver.find_element(By.ID, "f-train.epochs").get_attribute("aria-invalid") == "true"
    shot(driver, shots, "03-new-job-error")
    set_field(driver, "train.epochs", "2")

    driver.find_element(By.ID, "plan-button").click()
    wait(driver, lambda d: d.find_elements(By.ID, "plan-table"), what="the plan")
    plan_text = driver.find_element(By.ID, "plan").text
    assert "N=2 factors" in plan_text and "composed" in plan_text
    assert not error.is_displayed()
    shot(driver, shots, "04-new-job-plan")

    driver.find_element(By.ID, "submit-job").click()
    wait(
        driver,
        lambda d: "/ui/jobs/" in d.current_url and not d.current_url.endswith("/new"),
        what="the job page",
    )
    job_id = job_id_of(driver.current_url)
    progress = watch_job_page(driver, lambda: shot(driver, shots, "05-job-running", full_page=False))
    assert progress[-1] == 1.0
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    shot(driver, shots, "06-job-finished")
    return job_id


def test_job_page_shows_results_pareto_chart_and_downloads_with_checksums(
    service: Service, browser: Any, shots: Path, downloads: Path, finished_job: str
) -> None:
    driver = browser
    driver.get(f"{service.url}/ui/jobs/{finished_job}")
    with api(service, service.key_a) as client:
        report = client.get(f"/v1/jobs/{finished_job}/report").json()
        events = client.get(f"/v1/jobs/{finished_job}/events").json()["data"]

    # the live chart's table: one row per training epoch the worker recorded
    rows = driver.find_elements(By.CSS_SELECTOR, "#epoch-rows tr")
    train_epochs = [
        e for e in events if e["stage"] == "train" and e["epoch"] is not None and e["loss"] is not None
    ]
    assert len(rows) >= len(train_epochs) >= 1
    assert driver.find_elements(By.CSS_SELECTOR, "#live-chart svg polyline")

    # the before/after table has the report's figures
    table = driver.find_element(By.ID, "before-after").text
    assert f"{report['params']['before']:,}" in table and f"{report['params']['after']:,}" in table

    # every evaluated point is drawn, the chosen one marked; hovering shows its figures
    points = driver.find_elements(By.CSS_SELECTOR, ".chart-box[data-axis=params] circle.point")
    assert len(points) == len([p for p in report["pareto"] if p.get("val_accuracy") is not None])
    chosen = driver.find_elements(By.CSS_SELECTOR, ".chart-box[data-axis=params] circle.point.chosen")
    assert len(chosen) == 1
    chosen_point = next(p for p in report["pareto"] if p.get("chosen"))
    assert int(chosen[0].get_attribute("data-params")) == chosen_point["params"]
    ActionChains(driver).move_to_element(chosen[0]).perform()
    info = driver.find_element(By.ID, "point-info")
    wait(driver, lambda d: "parameters" in info.text, what="the hovered point's figures")
    assert f"{chosen_point['params']:,}" in info.text and "chose" in info.text

    # ranks: one bar pair per layer, and the table behind it
    ranks = driver.find_elements(By.CSS_SELECTOR, "#ranks-table tbody tr")
    assert len(ranks) == len(report["ranks"])
    assert driver.find_element(By.CSS_SELECTOR, "img.plot").get_attribute("naturalWidth") != "0"
    shot(driver, shots, "07-job-results")
    driver.set_window_size(390, 844)  # a phone: nothing wider than the screen
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
    shot(driver, shots, "07b-job-results-phone")
    driver.set_window_size(1280, 1000)

    # a download from the files table; its bytes match the listed sha256
    row = driver.find_element(By.CSS_SELECTOR, "#artifacts tr[data-name='model.safetensors']")
    listed = row.get_attribute("data-sha256")
    names = [
        r.get_attribute("data-name") for r in driver.find_elements(By.CSS_SELECTOR, "#artifacts tbody tr")
    ]
    assert not [n for n in names if n.startswith("dense/")]  # the dense model is not among the downloads
    row.find_element(By.TAG_NAME, "a").click()
    target = downloads / "model.safetensors"
    wait(driver, lambda d: target.is_file() and not list(downloads.glob("*.crdownload")), what="the download")
    assert hashlib.sha256(target.read_bytes()).hexdigest() == listed

    # the jobs list shows the finished job with its figures and a full progress bar
    driver.get(f"{service.url}/ui/jobs")
    row = driver.find_element(By.CSS_SELECTOR, f"#jobs tr[data-job-id='{finished_job}']")
    assert row.get_attribute("data-status") == "succeeded"
    assert float(row.find_element(By.TAG_NAME, "progress").get_attribute("value")) == 1.0
    assert f"{report['params']['after']:,}" in row.text
    shot(driver, shots, "08-jobs-list")
    driver.set_window_size(390, 844)  # a phone
    shot(driver, shots, "09-jobs-list-phone")
    driver.set_window_size(1280, 1000)


def test_use_this_point_creates_a_derived_job_that_succeeds(
    service: Service, browser: Any, shots: Path, finished_job: str
) -> None:
    driver = browser
    driver.get(f"{service.url}/ui/jobs/{finished_job}")
    candidates = [
        c
        for c in driver.find_elements(By.CSS_SELECTOR, ".chart-box[data-axis=params] circle.point")
        if c.get_attribute("data-chosen") == "false" and float(c.get_attribute("data-params-fraction")) < 1.0
    ]
    assert candidates, "the search evaluated no smaller point"
    point = min(candidates, key=lambda c: float(c.get_attribute("data-params-fraction")))
    index = int(point.get_attribute("data-index"))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", point)
    driver.execute_script("arguments[0].focus()", point)  # the keyboard path: focus, then Enter
    assert driver.switch_to.active_element == point
    ActionChains(driver).send_keys(Keys.ENTER).perform()
    form = driver.find_element(By.ID, "use-point")
    wait(driver, lambda d: form.is_displayed(), what="the 'use this point' form")
    assert driver.switch_to.active_element == driver.find_element(By.ID, "use-point-button")
    shot(driver, shots, "10-use-this-point")
    driver.find_element(By.ID, "use-point-button").click()
    wait(driver, lambda d: job_id_of(d.current_url) != finished_job, what="the derived job's page")
    derived = job_id_of(driver.current_url)
    assert f"/ui/jobs/{finished_job}" in driver.page_source  # "another operating point of <parent>"
    progress = watch_job_page(driver)
    assert progress[-1] == 1.0
    shot(driver, shots, "11-derived-job")
    with api(service, service.key_a) as client:
        job = client.get(f"/v1/jobs/{derived}").json()
        report = client.get(f"/v1/jobs/{derived}/report").json()
        clicked = client.get(f"/v1/jobs/{finished_job}/report").json()["pareto"][index]
    assert job["status"] == "succeeded"
    # the derived job builds exactly the clicked point: its ranks, so its size, FLOPs and (same
    # dense model, same validation split, no fine-tuning) its validation accuracy
    assert job["config"]["compress"] == {"policy": "ranks", "ranks": clicked["ranks"], "round_to": None}
    chosen = next(p for p in report["pareto"] if p["chosen"])
    figures = ("params", "flops", "val_accuracy", "ranks")
    print(f"clicked point {index} of {finished_job}: " + ", ".join(f"{k}={clicked[k]}" for k in figures[:3]))
    print(f"derived job {derived}: " + ", ".join(f"{k}={chosen[k]}" for k in figures[:3]))
    assert {k: chosen[k] for k in figures} == {k: clicked[k] for k in figures}
    assert report["params"]["after"] == clicked["params"] and report["flops"]["after"] == clicked["flops"]
    assert report["accuracy"]["val"]["after"] == clicked["val_accuracy"]
    assert report["training"] is not None  # carried over from the parent: nothing was trained


def test_another_tenant_cannot_see_or_open_the_job_and_forged_requests_are_refused(
    service: Service, browser: Any, shots: Path, finished_job: str
) -> None:
    driver = browser
    # tenant B: the job is not listed, and its URL is "not found"
    sign_in(driver, service.url, service.key_b)
    assert finished_job not in driver.page_source
    driver.get(f"{service.url}/ui/jobs/{finished_job}")
    assert "Not found" in driver.find_element(By.TAG_NAME, "h1").text
    shot(driver, shots, "12-other-tenant-not-found")
    driver.get(f"{service.url}/ui/api/jobs/{finished_job}")
    assert '"detail"' in driver.page_source and "not found" in driver.page_source

    sign_in(driver, service.url, service.key_a)
    session_cookie = driver.get_cookie("lorita_session")
    assert (
        session_cookie is not None and session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"
    )
    with api(service, service.key_a) as client:
        before = client.get("/v1/jobs", params={"limit": 100}).json()["count"]

    # a forged cross-site form, auto-submitted from another origin while A is signed in
    forged = (
        f"<form id='f' method='post' action='{service.url}/ui/jobs/{finished_job}/select'>"
        "<input name='point' value='1'></form>"
        "<script>document.getElementById('f').submit()</script>"
    )
    driver.get("data:text/html," + forged)
    time.sleep(1.5)
    assert "/ui/jobs/" not in driver.current_url or "select" in driver.current_url
    with httpx.Client(base_url=service.url, timeout=30) as raw:
        no_cookie = raw.post(f"/ui/jobs/{finished_job}/select", data={"point": "1"})
        cookies = {"lorita_session": session_cookie["value"]}
        no_token = raw.post(f"/ui/jobs/{finished_job}/select", data={"point": "1"}, cookies=cookies)
        page = raw.get(f"/ui/jobs/{finished_job}", cookies=cookies).text
        token = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
        other_origin = raw.post(
            f"/ui/jobs/{finished_job}/select",
            data={"point": "1", "csrf": token},
            cookies=cookies,
            headers={"Origin": "http://evil.example"},
        )
        api_no_token = raw.post("/ui/api/plan", json={}, cookies=cookies)
        api_no_cookie = raw.get("/ui/api/jobs")
    assert no_cookie.status_code == 401
    assert no_token.status_code == 403 and "CSRF" in no_token.text
    assert other_origin.status_code == 403 and "cross-site request refused" in other_origin.text
    assert api_no_token.status_code == 403 and api_no_cookie.status_code == 401
    with api(service, service.key_a) as client:
        after = client.get("/v1/jobs", params={"limit": 100}).json()["count"]
    assert after == before  # nothing forged created a job


def test_an_archive_of_mixed_image_sizes_asks_for_an_image_size(
    service: Service, browser: Any, shots: Path, tmp_path: Path
) -> None:
    import io
    import zipfile

    from PIL import Image

    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for cls, size in (("cat", (8, 6)), ("dog", (5, 5))):
            for i in range(4):
                png = io.BytesIO()
                Image.new("RGB", size, (60 * i, 0, 0)).save(png, format="PNG")
                zf.writestr(f"{cls}/{i}.png", png.getvalue())
    driver = browser
    sign_in(driver, service.url, service.key_a)
    driver.get(f"{service.url}/ui/jobs/new")
    driver.find_element(By.ID, "ud-file").send_keys(str(archive))
    driver.find_element(By.CSS_SELECTOR, "#upload-dataset button[type=submit]").click()
    result = driver.find_element(By.CSS_SELECTOR, "#upload-dataset .upload-result")
    wait(driver, lambda d: result.text.startswith("Uploaded"), what="the archive upload")
    assert "differ in size (8x6, 5x5): set an image size below" in result.text
    set_field(driver, "model.options", json.dumps({"depth": 2, "width": 16}))

    driver.find_element(By.ID, "plan-button").click()  # the dry run checks the config as a submit does
    error = driver.find_element(By.ID, "err-dataset.image_size")
    wait(driver, lambda d: error.is_displayed(), what="the error next to the image size")
    assert "holds images of different sizes (8x6 like cat/0.png and 5x5 like dog/0.png)" in error.text
    shot(driver, shots, "10-image-size-needed")

    set_field(driver, "dataset.image_size", "8")
    driver.find_element(By.ID, "plan-button").click()
    wait(driver, lambda d: d.find_elements(By.ID, "plan-table"), what="the plan")
    assert not error.is_displayed()
