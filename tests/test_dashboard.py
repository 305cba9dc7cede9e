"""The web page in a real headless Chromium (Debian's, driven by Selenium) against a real cluster:
it loads without console errors, shows every device with its numbers, streams a chat answer, stops
one on request, and shows a killed worker red and, once it is back, green."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from cluster_proc import ClusterProcess
from hf_reference import make_hf_checkpoint
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from edge.messages import HEARTBEAT_TIMEOUT


def browser(width: int = 1280, height: int = 900, phone: bool = False) -> webdriver.Chrome:
    """Headless Chromium; `phone` emulates a phone's screen (a headless window is at least 500 px wide)."""
    options = webdriver.ChromeOptions()
    if phone:
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": width, "height": height,
                                                                               "pixelRatio": 3.0}})
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def console_errors(driver: webdriver.Chrome) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


CARDS_JS = """
return [...document.querySelectorAll('.device')].map((card) => {
  const terms = [...card.querySelectorAll('dt')].map((e) => e.textContent);
  const values = [...card.querySelectorAll('dd')].map((e) => e.textContent);
  return [card.dataset.rank, card.dataset.state, card.dataset.health, terms, values];
});
"""


def cards(driver: webdriver.Chrome) -> dict[str, dict]:
    """Each device card as the page shows it now (read in one script: the page redraws twice a second)."""
    return {rank: {"state": state, "health": health, **dict(zip(terms, values, strict=True))}
            for rank, state, health, terms, values in driver.execute_script(CARDS_JS)}


def api_answer(url: str, prompt: str) -> dict:
    """The API's own greedy answer to `prompt` as the page asks it (64 tokens at most), not streamed."""
    model = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=30).read())["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
    return reply["choices"][0] | {"tokens": reply["usage"]["completion_tokens"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=13)


def test_the_page_shows_the_cluster_chats_and_follows_a_lost_worker(model, tmp_path):
    cluster = ClusterProcess(model, 3, tmp_path)  # rank 0 and 2 workers
    driver, restarted = browser(), None
    try:
        driver.get(cluster.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(cards(d)) == 3 and all(c["health"] == "ok" for c in cards(d).values()))
        shown = cards(driver)
        health = json.loads(urllib.request.urlopen(cluster.url + "/health").read())
        for entry in health["plan"]:  # the numbers the server reports, per device
            card = shown[str(entry["rank"])]
            assert card["heads"] == str(entry["heads"]) and card["MLP columns"] == str(entry["mlp_columns"])
            assert card["weights"].endswith("MB") and card["weights"] != "0.0 MB"
            assert card["budget"] == "none (resident)" and card["host"]

        driver.find_element(By.ID, "prompt").send_keys("Hello there")
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")  # greedy, so the page's answer can be checked against the API's
        driver.find_element(By.CSS_SELECTOR, "#send button").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        expected = api_answer(cluster.url, "Hello there")
        shown_text = driver.execute_script("return arguments[0].querySelector('.text').textContent", answer)
        assert expected["message"]["content"] and shown_text == expected["message"]["content"]
        assert answer.get_attribute("data-finish") == expected["finish_reason"]
        route = driver.find_element(By.CLASS_NAME, "route").text
        assert "route: edge" in route and f"{expected['tokens']} tokens" in route

        cluster.kill_worker(2)
        began = time.monotonic()
        WebDriverWait(driver, HEARTBEAT_TIMEOUT).until(lambda d: cards(d).get("2", {}).get("health") == "bad")
        assert time.monotonic() - began < HEARTBEAT_TIMEOUT
        restarted = cluster.start_worker(2)
        WebDriverWait(driver, 60).until(lambda d: cards(d).get("2", {}).get("health") == "ok")
        assert console_errors(driver) == []
    finally:
        driver.quit()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=20)
        cluster.stop()


def counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


def test_stop_ends_the_answer_and_the_generation_behind_it(model, tmp_path):
    """Send turns into Stop while an answer streams; Stop closes the stream, the page says so, and the
    server stops generating (a cancelled request, fewer tokens than asked for)."""
    cluster = ClusterProcess(model, 2, tmp_path, "--link-latency-ms", "40")  # a token takes ~0.5 s
    driver = browser()
    try:
        driver.get(cluster.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(cards(d)) == 2)
        driver.find_element(By.ID, "prompt").send_keys("Tell me a long story")
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")  # greedy: this model's answer runs all 64 tokens, so only Stop ends it early
        driver.find_element(By.ID, "send-button").click()
        wait.until(lambda d: d.find_element(By.ID, "send-button").text == "Stop"
                   and d.find_element(By.CSS_SELECTOR, ".route").text.startswith("route: edge"))
        driver.find_element(By.ID, "send-button").click()
        answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        assert answer.get_attribute("data-finish") == "aborted"
        assert "stopped by you" in driver.find_element(By.CLASS_NAME, "route").text
        assert driver.find_element(By.ID, "send-button").text == "Send"
        wait.until(lambda d: counters(cluster.url)["edge_requests_cancelled_total"] == 1)
        assert counters(cluster.url)["edge_generated_tokens_total"] < 64
        assert console_errors(driver) == []
    finally:
        driver.quit()
        cluster.stop()


def test_the_page_asks_for_the_api_key_and_works_at_phone_width(model, tmp_path):
    cluster = ClusterProcess(model, 2, tmp_path, "--api-key", "page-key-123")
    driver = browser(390, 844, phone=True)
    try:
        driver.get(cluster.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "keybox").is_displayed())
        assert cards(driver) == {}  # nothing without the key
        driver.find_element(By.ID, "key").send_keys("page-key-123")
        driver.find_element(By.CSS_SELECTOR, "#keyform button").click()
        wait.until(lambda d: len(cards(d)) == 2)
        viewport, width = driver.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]")
        assert viewport == 390 and width <= 390  # a phone's width, and no sideways scrolling on it
        errors = [e for e in console_errors(driver) if "401" not in e["message"]]  # the refused feed, by design
        assert errors == []
    finally:
        driver.quit()
        cluster.stop()
