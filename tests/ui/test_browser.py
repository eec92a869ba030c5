"""``sft ui`` in a real browser: Debian's headless Chromium driven by selenium, against ``sft ui``
started as a user would (a subprocess on a free port) over a tiny training run, a tiny sweep and a
run that is still being written. Screenshots of each page go to ``$SFT_UI_SCREENSHOTS`` (default:
the test's temporary folder) to look at.

Needs ``apt-get install chromium chromium-driver`` (.ci/run installs them); without them the test
fails saying so, it does not skip."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft.config import load_config
from sft.training.loop import train
from sft.tuning.sweep import run_sweep

pytestmark = pytest.mark.slow
EVIL = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def overrides(tiny_dir: Path, data_file: Path, out: Path) -> list[str]:
    return [f"--model={tiny_dir}", f"--data.train={data_file}", f"--output_dir={out}", "--train.lr=1e-3",
            "--train.precision=fp32", "--train.warmup=0", "--data.max_length=128", "--train.batch_size=2",
            f"--data.cache_dir={out.parent / 'cache'}", "--eval.split=0.25", "--eval.every=2",
            "--eval.before_after=true", "--eval.max_new_tokens=4", "--eval.reference_tokens=256", "--eval.samples=2"]


@pytest.fixture()
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: "
                    "apt-get install -y chromium chromium-driver (.ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    b = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    yield b
    b.quit()


def wait_for(cond, timeout: float = 20.0, what: str = ""):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_ui_in_a_real_browser(tmp_path, tiny_dir, data_file, browser):
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get("SFT_UI_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "runs"
    train(load_config(None, [*overrides(tiny_dir, data_file, root / "tiny"), "--train.max_steps=6"]), progress=False)
    sweep_dir = root / "sweep"
    assert run_sweep(None, [*overrides(tiny_dir, data_file, sweep_dir), "--train.max_steps=4",
                            "--train.lr=1e-3,1e-4", "--sweep.objective=eval_loss"], progress=False) == 0
    # a model reply holding markup, as a user's model might write it
    after = json.loads((root / "tiny" / "after.json").read_text())
    after["samples"][0]["reply"] = EVIL
    (root / "tiny" / "after.json").write_text(json.dumps(after))
    # a run still being written: two steps now, more while the page is open
    live = root / "live"
    live.mkdir()
    (live / "config.yaml").write_text((root / "tiny" / "config.yaml").read_text())
    rows = [json.loads(x) for x in (root / "tiny" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    (live / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    ui = subprocess.Popen([sys.executable, "-m", "sft", "ui", str(root), "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(up, 30, "sft ui to listen")

        # runs table
        browser.get(base + "/")
        table = {tr.get_attribute("data-run"): tr.find_element(By.CSS_SELECTOR, ".status").text
                 for tr in browser.find_elements(By.CSS_SELECTOR, "#runs tbody tr")}
        assert table == {"live": "running", "sweep/trials/lr=1e-03": "finished", "sweep/trials/lr=1e-04": "finished",
                         "tiny": "finished"}
        browser.save_screenshot(str(shots / "runs.png"))

        # a finished run: curves drawn, the injected reply shown as text and never run
        browser.get(base + "/run?id=tiny")
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '.chart[data-key="loss"] polyline'), what="loss curve")
        assert browser.find_element(By.CSS_SELECTOR, '.chart[data-key="loss"]').get_attribute("data-points") == "6"
        assert browser.find_element(By.CSS_SELECTOR, '.chart[data-key="eval_loss|dev_loss"]').get_attribute("data-points") == "3"  # steps 2, 4 and the end
        replies = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#samples pre.reply")]
        assert EVIL in replies
        assert browser.execute_script("return window.__pwned") is None
        assert not browser.find_elements(By.CSS_SELECTOR, "#samples img")
        browser.save_screenshot(str(shots / "run.png"))

        # a running run: its curve grows as metrics.jsonl grows, without a reload
        browser.get(base + "/run?id=live")
        loss = browser.find_element(By.CSS_SELECTOR, '.chart[data-key="loss"]')
        wait_for(lambda: loss.get_attribute("data-points") == "2", what="2 points")
        browser.execute_script("window.__same_page = true")
        with (live / "metrics.jsonl").open("a") as f:
            for r in rows[2:5]:
                f.write(json.dumps(r) + "\n")
            f.write('{"step": 6, "lo')  # half a line: shown once it is whole
            f.flush()
            wait_for(lambda: loss.get_attribute("data-points") == "5", what="5 points")
            f.write(f'ss": {rows[5]["loss"]}}}\n')
        wait_for(lambda: loss.get_attribute("data-points") == "6", what="6 points")
        assert browser.execute_script("return window.__same_page") is True  # no reload happened
        assert browser.find_element(By.ID, "step").text == "6"
        browser.save_screenshot(str(shots / "live.png"))

        # compare two runs, then the sweep's trials from the runs page's link
        browser.get(base + "/compare?id=tiny&id=live")
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, '.chart[data-key="loss"] polyline')) == 2,
                 what="two loss curves")
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#compare-runs tbody a")] == ["tiny", "live"]
        browser.get(base + "/")
        browser.find_element(By.CSS_SELECTOR, "a.sweep").click()
        wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, '.chart[data-key="loss"] polyline')) == 2,
                 what="two trial curves")
        differs = [tr.find_element(By.TAG_NAME, "td").text for tr in browser.find_elements(By.CSS_SELECTOR, "#config-diff tr.differs")]
        assert differs == ["train.lr"]
        browser.save_screenshot(str(shots / "compare.png"))

        # data preview, searched by file:line
        browser.get(base + f"/data?id=tiny&q={data_file.name}:3")
        trained = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".example .trained")]
        assert trained == ["5 plus 6 is 11. Indeed.<|im_end|>"]
        browser.save_screenshot(str(shots / "data.png"))
    finally:
        ui.terminate()
        out = ui.communicate(timeout=20)[0]
    assert f"sft ui: http://127.0.0.1:{port}/" in out
