"""The MLflow UI checked as a person would: a tiny finished sweep, ``mlflow server`` on 127.0.0.1, and
Debian's headless Chromium driven by selenium through Debian's chromedriver (`make browser` installs
both; selenium never downloads a driver: the driver's path is given).

- The experiment page lists the sweep; expanding it shows one child run per arm; the columns a
  person would add (a parameter the grid changes, ``optim.lr``, ``train/loss``) show each arm's
  values as MLflow holds them, and the Dataset column names the arm's training data.
- A child run's sample mp4, opened in the artifact viewer, is a <video> Chromium decodes (its size
  and duration are the sample's), fetched from the endpoint the UI itself calls with ``video/mp4``.

Screenshots (PNG) go to the test's tmp_path; their paths are printed (``pytest -s`` shows them).
Runs in 25-50 s on 2 shared CPU cores: the sweep is built while the server starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pytest
from mlflow.tracking import MlflowClient
from conftest import output_dir_at

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SERVER_START_S = 120  # mlflow server imports take ~10 s idle, 35 s on a loaded 2-core machine
WAIT_S = 30  # for the UI to render something after a navigation or click
ABLATION = """
name: ui
experiment: smoke
overrides: [trainer.max_steps=2, trainer.log_every_n_steps=1, callbacks.samples.every_n_steps=0,
            callbacks.timestep_loss=null, data.num_videos=8]
grid:
  objective: [rectified_flow, rectified_flow_lognorm]
  optim.lr: [0.001]
seeds: [0]
"""
VARYING_PARAM = "objective.time_sampling"  # differs between the two objective presets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_health(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    pytest.fail(f"mlflow server did not answer {url}/health in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def _start_server(uri: str, artifacts: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on a free port of 127.0.0.1, in its own process group (the CLI starts a
    uvicorn worker), one worker, no job runners: what the UI needs and no more."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--artifacts-destination",
             str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and the uvicorn worker it started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Any:
    """A finished two-arm sweep in a fresh store and ``mlflow server`` over it; yields
    ``(base_url, client, results)``. The server starts first (on the created, empty store) so its
    slow start overlaps the training; should it have exited meanwhile (its port taken by another
    process, the store busy), it is started once more on the finished store."""
    from experiments.sweep import run_sweep

    root = tmp_path_factory.mktemp("ui")
    out, log = root / "outputs", root / "mlflow-server.log"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    out.mkdir()
    MlflowClient(uri).search_experiments()  # creates the schema before two processes touch the file
    proc, url = _start_server(uri, out / "mlartifacts", log)
    try:
        ablation = root / "ui.yaml"
        ablation.write_text(ABLATION)
        with output_dir_at(out):
            results = run_sweep(ablation)
        assert [r.status for r in results] == ["FINISHED", "FINISHED"]
        if proc.poll() is not None:
            print(f"mlflow server exited with {proc.returncode} during the sweep; starting it again:\n"
                  f"{log.read_text()[-2000:]}")
            proc, url = _start_server(uri, out / "mlartifacts", root / "mlflow-server-2.log")
            log = root / "mlflow-server-2.log"
        _wait_for_health(url, proc, log)
        yield url, MlflowClient(uri), results
    finally:
        _stop_server(proc)


@pytest.fixture(scope="module")
def browser() -> Any:
    """Headless Debian Chromium through Debian's chromedriver, network log on (to see what the UI
    fetches). Missing: a failure naming `make browser`, not a skip, so CI cannot pass without it."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `make browser` (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: `make test` installs the dev extras (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1920,1080",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    for attempt in (1, 2):  # a loaded machine now and then fails Chromium's start ("DevToolsActivePort")
        try:
            # a driver path in Service: selenium does not call selenium-manager, nothing is downloaded
            driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
            break
        except WebDriverException as exc:
            if attempt == 2:
                pytest.fail(f"Chromium did not start through {CHROMEDRIVER} twice: {exc.msg}")
            print(f"Chromium did not start ({exc.msg}); trying once more")
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, what: str, condition: Callable[[Any], Any], path: Path | None = None) -> Any:
    """`WebDriverWait` whose timeout says what was awaited and saves a screenshot of the page then."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException:
        if path is not None:
            driver.save_screenshot(str(path))
        pytest.fail(f"the UI did not show {what} within {WAIT_S} s (page: {driver.current_url}; screenshot: {path})")


def _screenshot(driver: Any, path: Path) -> Path:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {path}")
    return path


def _close_assistant(driver: Any) -> None:
    """MLflow 3's assistant panel takes a third of the width: closed, as a person would."""
    from selenium.webdriver.common.by import By

    close = "button[data-component-id='mlflow.assistant.chat_panel.close']"
    for button in driver.find_elements(By.CSS_SELECTOR, close):
        if button.is_displayed():
            button.click()


def _add_column(driver: Any, name: str, shots: Path) -> None:
    """Columns → search ``name`` → tick it (the runs table shows no param or metric by default)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.CSS_SELECTOR, "button[data-testid='column-selection-dropdown']").click()
    box = _wait(driver, "the column search box",
                lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']"), shots)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(name)
    nodes = "[role=dialog] .du-bois-light-tree-treenode"
    node = _wait(driver, f"the column {name!r} in the column selector",
                 lambda d: [n for n in d.find_elements(By.CSS_SELECTOR, nodes) if n.text.strip() == name], shots)[0]
    node.find_element(By.CSS_SELECTOR, ".du-bois-light-tree-checkbox").click()
    box.send_keys(Keys.ESCAPE)


def _cell(driver: Any, run_id: str, column: str) -> str:
    """The text of a runs-table cell: ag-grid rows carry the run id, cells the column id."""
    from selenium.webdriver.common.by import By

    cells = driver.find_elements(By.CSS_SELECTOR, f"[row-id='{run_id}'] [col-id='{column}']")
    return cells[0].get_attribute("textContent").strip() if cells else ""


def test_experiment_page_lists_the_arms_with_params_and_metrics(browser, ui, tmp_path):
    from selenium.webdriver.common.by import By

    url, client, results = ui
    experiment = client.get_experiment_by_name("vidlab").experiment_id
    arms = {r.run_id: client.get_run(r.run_id) for r in results}
    parent = arms[results[0].run_id].data.tags["mlflow.parentRunId"]
    browser.get(f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning")  # not the GenAI view
    button = f"[row-id='{parent}'] button[data-component-id*='runnamecellrenderer']"
    expand = _wait(browser, "the sweep's run with its expand button",
                   lambda d: d.find_elements(By.CSS_SELECTOR, button), tmp_path / "timeout.png")
    _close_assistant(browser)
    names = [run.info.run_name for run in arms.values()]
    assert not any(name in browser.page_source for name in names)  # children are folded under the sweep
    _screenshot(browser, tmp_path / "experiment_folded.png")
    expand[0].click()
    _wait(browser, "a row per arm", lambda d: all(_cell(d, run_id, "attributes.`Run Name`") for run_id in arms),
          tmp_path / "timeout.png")
    for column in (VARYING_PARAM, "optim.lr", "train/loss"):
        _add_column(browser, column, tmp_path / "timeout.png")
    _wait(browser, "the added columns", lambda d: all(_cell(d, run_id, "metrics.`train/loss`") for run_id in arms),
          tmp_path / "timeout.png")
    shot = _screenshot(browser, tmp_path / "experiment_arms.png")

    assert _cell(browser, parent, "attributes.`Run Name`").endswith("sweep:ui")
    for run_id, run in arms.items():
        assert _cell(browser, run_id, "attributes.`Run Name`").endswith(run.info.run_name)
        for param in (VARYING_PARAM, "optim.lr"):
            assert _cell(browser, run_id, f"params.`{param}`") == run.data.params[param], (param, shot)
        shown = _cell(browser, run_id, "metrics.`train/loss`")
        assert float(shown) == pytest.approx(run.data.metrics["train/loss"], rel=1e-6), shot
        dataset = run.inputs.dataset_inputs[0].dataset
        assert dataset.name in _cell(browser, run_id, "attributes.`Dataset`"), shot
    assert len({_cell(browser, run_id, f"params.`{VARYING_PARAM}`") for run_id in arms}) == 2  # the arms differ


def _responses(driver: Any) -> list[dict[str, Any]]:
    """The HTTP responses Chromium received since the last call (its performance log)."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            out.append(message["params"]["response"])
    return out


def test_child_run_mp4_plays_in_the_artifact_viewer_and_is_served_as_video(browser, ui, tmp_path):
    from selenium.webdriver.common.by import By

    url, client, results = ui
    run_id = results[0].run_id
    run = client.get_run(run_id)
    (sample,) = [a.path for a in client.list_artifacts(run_id, "samples/step_000002")]
    folder, name = sample.rsplit("/", 1)
    _responses(browser)  # drop what earlier pages fetched
    browser.get(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run_id}/artifacts?workflowType=machine_learning")
    _close_assistant(browser)
    for label in (*folder.split("/"), name):  # samples → step_000002 → the mp4, in the artifact tree
        _wait(browser, f"{label!r} in the artifact tree", lambda d, t=label: [
            e for e in d.find_elements(By.XPATH, f"//*[normalize-space(text())={json.dumps(t)}]") if e.is_displayed()],
            tmp_path / "timeout.png")[0].click()
    _wait(browser, "a <video> with its metadata loaded", lambda d: d.execute_script(
        "const v = document.querySelector('video'); return v !== null && (v.readyState >= 1 || v.error !== null)"),
        tmp_path / "timeout.png")
    state = browser.execute_script(
        "const v = document.querySelector('video'); return {error: v.error && v.error.code, "
        "width: v.videoWidth, height: v.videoHeight, duration: v.duration, controls: v.controls}")
    shot = _screenshot(browser, tmp_path / "artifact_video.png")

    params = run.data.params
    size = int(params["data.height"]) * int(params["callbacks.samples.display_scale"])
    assert state["error"] is None, (state, shot)  # Chromium decoded the H.264 stream
    assert (state["width"], state["height"]) == (size, size) and state["controls"], (state, shot)
    seconds = int(params["data.num_frames"]) / int(params["callbacks.samples.fps"])
    assert state["duration"] == pytest.approx(seconds, abs=0.05), (state, shot)

    # the request the viewer made for the file, and the same URL fetched again: video/mp4, the bytes logged
    fetched = [r for r in _responses(browser) if "get-artifact" in r["url"] and quote(name) in r["url"]]
    assert fetched and fetched[0]["status"] == 200 and fetched[0]["mimeType"] == "video/mp4", fetched
    with urllib.request.urlopen(fetched[0]["url"], timeout=10) as response:
        assert response.headers.get_content_type() == "video/mp4"
        body = response.read()
    assert body == Path(client.download_artifacts(run_id, sample)).read_bytes()
