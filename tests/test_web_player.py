"""musicgen-web, the browser player: a gateway process against a real server on loopback, its page driven by
Debian's headless Chromium through Selenium. The page's AudioWorklet plays into Chromium's audio output (with
no sound card Chromium falls back to a fake output that still consumes audio in real time) and acks what it
played, so the server is paced by the browser as by the native Player."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LEAD_SECONDS = 0.5  # short, so a few seconds of playback are many leads: only acks can let the server go on
SCREENSHOT_COPY = os.environ.get("MUSICGEN_WEB_SCREENSHOT")  # a path to keep the screenshot at, if set

needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")


class Gateway:
    """A musicgen-web process on a free loopback port, talking to `server`."""

    def __init__(self, server):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.web_gateway", "--server", server.address, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.process.stdout.readline()
        assert line.startswith("musicgen-web: listening on http://"), self.process.stderr.read()
        self.url = line.split("listening on ", 1)[1].strip()  # http://127.0.0.1:PORT/

    def close(self) -> str:
        """Stop the gateway (SIGTERM); its log."""
        self.process.terminate()
        try:
            _, log = self.process.communicate(timeout=10)
        finally:
            self.process.kill()
        return log


@pytest.fixture
def gateway(mono_server):
    running = Gateway(mono_server)
    yield running
    running.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with chromedriver's path below, Selenium Manager fetches nothing
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def set_weights(browser, *weights: float) -> None:
    """Move the page's weight sliders as a user would (each fires its input event)."""
    browser.execute_script("""
        arguments[0].forEach((value, index) => {
          const slider = document.getElementById(`weight-${index}`);
          slider.value = String(value);
          slider.dispatchEvent(new Event("input"));
        });""", list(weights))


def wait_for(read, timeout: float = 30.0, what: str = "condition"):
    """Poll `read()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = read()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@needs_chromium
def test_the_page_plays_a_session_paced_by_its_acks_and_shows_a_prompt_change(gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By

    def state() -> dict:
        return browser.execute_script("return window.musicgen.state")

    browser.get(f"{gateway.url}?lead={LEAD_SECONDS}")
    wait_for(lambda: state()["hello"], 20, "the gateway's hello")
    browser.find_element(By.ID, "prompt-0").clear()
    browser.find_element(By.ID, "prompt-0").send_keys("warm lofi beat")
    browser.find_element(By.ID, "play").click()
    wait_for(lambda: state()["sessionId"], 20, "the session to start")
    rate = state()["sampleRate"]

    # Played many leads' worth: the server went on only because the page acked what its worklet played.
    wait_for(lambda: state()["samplesPlayed"] >= 5 * LEAD_SECONDS * rate, 40, "5 leads of audio played")
    playing = state()
    assert playing["audioState"] == "running"
    assert playing["peak"] > 0  # what was played is the session's audio, not silence
    assert playing["leadSeconds"] == LEAD_SECONDS
    assert playing["samplesReceived"] >= 5 * LEAD_SECONDS * rate
    # The server sends a chunk only while under its lead over the acks, and every ack is what the page had
    # played: so received audio is never more than the lead plus one chunk ahead of what was played.
    allowed_ahead = LEAD_SECONDS * rate + playing["chunkSamples"]
    assert 0 < playing["maxAheadSamples"] <= allowed_ahead
    assert playing["acksSent"] > 10 and playing["gatewayAcks"] > 10  # the gateway passed the acks on
    assert 0 <= playing["samplesPlayed"] - playing["gatewaySamplesAcked"] < 0.5 * rate  # acks follow playback

    # A weighted prompt change: the page shows it once audio made under it plays.
    browser.find_element(By.ID, "prompt-1").send_keys("dark techno")
    set_weights(browser, 0.75, 0.25)
    browser.find_element(By.ID, "apply").click()
    wait_for(lambda: state()["playingRevision"] == 1, 20, "revision 1 to play")
    changed = state()
    assert [text for text, _ in changed["playingPrompts"]] == ["warm lofi beat", "dark techno"]
    assert [round(weight, 3) for _, weight in changed["playingPrompts"]] == [0.75, 0.25]
    assert changed["appliedRevisions"] == [1]  # the server's PROMPT_APPLIED notice
    assert "warm lofi beat 75% · dark techno 25%" in browser.find_element(By.ID, "now-playing").text
    assert changed["steerLatencyMs"] > 0

    # Instant steering: the server takes back what the page buffered; the worklet drops it and plays on.
    browser.find_element(By.ID, "instant").click()
    set_weights(browser, 0.25, 0.75)
    browser.find_element(By.ID, "apply").click()
    wait_for(lambda: state()["playingRevision"] == 2, 20, "revision 2 to play")
    instant = state()
    assert [round(weight, 3) for _, weight in instant["playingPrompts"]] == [0.25, 0.75]
    assert instant["retractions"] == 1 and instant["retractedLateFrames"] == 0
    assert instant["steerLatencyMs"] < changed["steerLatencyMs"]  # lands before the buffered lead plays out
    assert instant["errors"] == []

    figures = {name: browser.find_element(By.ID, f"fig-{name}").text
               for name in ("latency", "steer", "buffer", "underruns", "rtf", "played", "acks")}
    print("figures:", json.dumps(figures), "underrun_frames:", instant["underrunFrames"],
          "max_ahead_samples:", changed["maxAheadSamples"], "allowed:", allowed_ahead,
          "steer_ms (queued, instant):", round(changed["steerLatencyMs"]), round(instant["steerLatencyMs"]))
    assert figures["latency"].endswith(" ms") and figures["buffer"].endswith(" ms")
    screenshot = tmp_path / "web_player.png"
    assert browser.save_screenshot(str(screenshot))
    if SCREENSHOT_COPY:
        shutil.copy(screenshot, SCREENSHOT_COPY)
    print("screenshot:", screenshot)

    # Pause silences the page at once and pauses the server; play resumes both.
    browser.find_element(By.ID, "pause").click()
    wait_for(lambda: "paused" in state()["notices"], 10, "the server's PAUSED notice")
    held = state()["samplesPlayed"]
    time.sleep(0.5)
    assert state()["samplesPlayed"] == held
    browser.find_element(By.ID, "play").click()
    wait_for(lambda: "resumed" in state()["notices"], 10, "the server's RESUMED notice")
    wait_for(lambda: state()["samplesPlayed"] > held + 0.5 * rate, 10, "playback to go on")

    browser.find_element(By.ID, "stop").click()
    finished = wait_for(lambda: state()["finished"], 20, "Finished")
    assert finished["reason"] == "stopped"
    log = gateway.close()
    assert "event=ended acks=" in log


def test_bad_messages_get_an_error_and_the_gateway_keeps_running(gateway, mono_server):
    from client import MusicGenClient

    async def next_json(socket) -> dict:
        message = await socket.receive(timeout=20)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        return json.loads(message.data)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            refused = await http.get(f"{gateway.url}ws", headers={"Origin": "http://elsewhere.example"})
            assert refused.status == 403  # another site's page cannot open sessions through the gateway
            rebound = await http.get(f"{gateway.url}ws", headers={"Host": "attacker.example:8080",
                                                                   "Origin": "http://attacker.example:8080"})
            assert rebound.status == 403  # nor one whose name was rebound to 127.0.0.1

            socket = await http.ws_connect(f"{gateway.url}ws")
            hello = await next_json(socket)
            assert hello["type"] == "hello" and hello["sample_rate"] > 0
            bad_messages = [
                ("{not json", "malformed JSON"),
                ("[1, 2]", "expected a JSON object"),
                ('{"type": "dance"}', "unknown message type 'dance'"),
                ('{"type": "ack", "samples_played": "lots"}', "ack.samples_played must be an integer"),
                ('{"type": "start", "prompts": "warm"}', "start.prompts must be a list"),
                ('{"type": "start", "prompts": [{"text": 3}]}', "start.prompts[0].text must be a string"),
                ('{"type": "start", "prompts": [{"text": "a", "weight": -1}]}', "start.prompts[0].weight"),
                ('{"type": "prompt", "prompts": [{"text": "a"}]}', "no session is playing"),
                ('{"type": "start", "prompts": [{"text": "a"}], "lead_seconds": 99}', "max_lead_seconds"),  # server
            ]
            for text, expected in bad_messages:
                await socket.send_str(text)
                reply = await next_json(socket)
                assert reply["type"] == "error" and expected in reply["message"], (text, reply)
            await socket.send_bytes(b"\x00\x01")
            assert "binary messages are not accepted" in (await next_json(socket))["message"]

            await socket.send_str(json.dumps({"type": "start", "prompts": [{"text": "warm lofi beat"}],
                                              "lead_seconds": LEAD_SECONDS}))
            started = await next_json(socket)
            assert started["type"] == "started" and started["max_lead_seconds"] == LEAD_SECONDS
            chunk = await next_json(socket)
            while chunk["type"] != "chunk":
                chunk = await next_json(socket)
            audio = await socket.receive(timeout=20)
            start_sample, channels, reserved = struct.unpack_from("<qII", audio.data)
            samples = (len(audio.data) - 16) // (4 * channels)
            assert (start_sample, reserved) == (chunk["start_sample"], 0)
            assert start_sample + samples == chunk["end_sample"] and channels == started["channels"]
            await socket.send_str('{"type": "start", "prompts": [{"text": "again"}]}')
            assert "already playing" in (await anext_error(socket))["message"]
            for field, value in (("transition_seconds", 601), ("rollback_seconds", 11)):  # the server's ranges
                await socket.send_str(json.dumps({"type": "prompt", "prompts": [{"text": "x"}], field: value}))
                assert f"prompt.{field} must be a finite number in [0, " in (await anext_error(socket))["message"]
            await socket.close()  # closing the page's socket closes its session

    async def anext_error(socket) -> dict:
        while (message := await next_json(socket))["type"] != "error":
            pass
        return message

    asyncio.run(scenario())
    with MusicGenClient(mono_server.address) as client:
        wait_for(lambda: client.model_info().active_sessions == 0, 10, "the server to free the session")
    assert gateway.process.poll() is None  # still serving
