"""The report in a real browser: what a person sees in headless Chromium.

Trajectories come from the rollout engine with the simulated policy over real images (the path
`medvistagym rollout` takes, faults and malformed calls included). The page must load every
image, draw every zoom box where the trajectory says (checked in the SVG, in layout, and in the
screenshot's pixels), filter and page correctly, and log no error. The last test times 5,000
episodes.

Chromium is driven over its DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages on fds 3 and 4), so neither a Python package nor chromedriver is needed. Without a
Chromium binary (`apt-get install chromium`, or $MEDVISTAGYM_CHROMIUM) the tests skip.
Screenshots go to $MEDVISTAGYM_SCREENSHOT_DIR, else to the test's tmp dir.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medvistagym.engine import EngineConfig, RolloutEngine, run
from medvistagym.engine.export import TrajectoryWriter, read_trajectories
from medvistagym.engine.rollout import rollout_to_parquet
from medvistagym.engine.trajectory import ImageRecord, ToolCallRecord, Trajectory, TurnRecord
from medvistagym.env import EnvConfig
from medvistagym.env.task import AnswerType, ImageRef, Task
from medvistagym.policy import build_policy
from medvistagym.view import build_report


def find_chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return os.environ.get("MEDVISTAGYM_CHROMIUM") or next(filter(None, map(shutil.which, names)), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary: apt-get install chromium, or set MEDVISTAGYM_CHROMIUM")
PAGE_SIZE = 20  # the report's default


MOVE_FDS = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execvp(sys.argv[3], sys.argv[3:])")


def high_fd(fd: int) -> int:
    """`fd` renumbered to 10 or more, so that moving pipe ends to fds 3 and 4 clobbers neither."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium tab over the DevTools protocol. Every event is kept, so console
    errors can be checked after the fact."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser, self._out = map(high_fd, os.pipe())
        self._in, from_browser = map(high_fd, os.pipe())
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        # A Python trampoline moves the pipe's ends to fds 3 and 4, where Chromium expects them
        # (a shell's redirections take single-digit fds only).
        self.process = subprocess.Popen(
            [sys.executable, "-c", MOVE_FDS, str(to_browser), str(from_browser), executable, *flags],
            pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.events: list[dict] = []
        self._messages: queue.Queue[dict | None] = queue.Queue()
        self._last_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def _read(self) -> None:
        pending = b""
        while chunk := os.read(self._in, 1 << 20):
            *messages, pending = (pending + chunk).split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def _next(self, deadline: float) -> dict:
        try:
            message = self._messages.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            raise TimeoutError("Chromium did not answer in time") from None
        if message is None:
            raise RuntimeError(f"Chromium exited with {self.process.wait()}")
        return message

    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 60) -> dict:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while (reply := self._next(deadline)).get("id") != self._last_id:
            self.events.append(reply)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, path: Path, timeout: float = 120) -> float:
        """Load a file (events, errors included, start afresh); returns the seconds from the
        request to the load event."""
        self.events, seen = [], 0
        start = time.perf_counter()
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events[seen:]):
            self.events.append(self._next(deadline))
        return time.perf_counter() - start

    def js(self, expression: str) -> Any:
        """The value of a JS expression (promises awaited)."""
        reply = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise RuntimeError(reply["exceptionDetails"]["exception"]["description"])
        return reply["result"].get("value")

    def viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def screenshot(self) -> Image.Image:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and errors the browser logged."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(params["exceptionDetails"].get("exception", {}).get("description", "exception"))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(params["entry"]["text"])
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=10)
        except (RuntimeError, TimeoutError):
            pass  # it may close the pipe before answering
        os.close(self._out)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._in)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    page = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    page.viewport(1280, 1000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    named = os.environ.get("MEDVISTAGYM_SCREENSHOT_DIR")
    folder = Path(named) if named else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- a real rollout

CT = ImageRef(path=get_testdata_file("693_UNCR.dcm"))
DATA = Path(skimage.data.__file__).parent
IHC, CAMERA = ImageRef(path=str(DATA / "ihc.png")), ImageRef(path=str(DATA / "camera.png"))
TASKS = [
    Task("ct", "slake", "test", (CT,), "Is there a lesion?", "yes", AnswerType.CLOSED),
    Task("ihc", "pathvqa", "test", (IHC,), "Which stain?", "B", AnswerType.MULTIPLE_CHOICE,
         choices=("H&E", "IHC", "PAS", "Gram")),
    Task("two", "vqa-rad", "test", (CT, CAMERA), "Compare <image 1> and <image 2>.", "no", AnswerType.CLOSED),
    Task("cam", "pmc-vqa", "test", (CAMERA,), "Where is the finding?", "left lung", AnswerType.OPEN),
]


@pytest.fixture(scope="module")
def rollout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Trajectory]]:
    folder = tmp_path_factory.mktemp("view-browser")
    path = folder / "rollout.parquet"

    async def main() -> None:
        policy = build_policy("sim", latency={"time_scale": 0.0}, faults={"error_rate": 0.1},
                              malformed_call_rate=0.2)
        config = EngineConfig(group_size=4, max_retries=0, failed_members="keep_ok", min_group_members=1)
        try:
            await rollout_to_parquet(RolloutEngine(policy, EnvConfig(), config), TASKS * 3, path, progress=False)
        finally:
            await policy.close()

    run(main())
    report = folder / "report.html"
    build_report([path], report)
    return report, list(read_trajectories(path))


def expected_boxes(t: Trajectory) -> dict[int, tuple[float, ...]]:
    """Image number -> its box in the shown pixels of its question image, computed here from the
    trajectory alone: that image shows the whole source, `box` is in source pixels."""
    bases = {im.task_image: im for im in t.images if im.turn == 0}
    out = {}
    for number, im in enumerate(t.images):
        base = bases.get(im.task_image)
        if im.turn == 0 or base is None or im.task_image < 0:
            continue
        sx, sy = base.pixels.shape[2] / base.box[2], base.pixels.shape[1] / base.box[3]
        box = (im.box[0] * sx, im.box[1] * sy, im.box[2] * sx, im.box[3] * sy)
        if max(abs(a - b) for a, b in zip(box, (0, 0, base.pixels.shape[2], base.pixels.shape[1]))) >= 0.5:
            out[number] = box
    return out


IMAGES_JS = """(async () => {
  await Promise.all([...document.images].map((img) => img.decode()));
  return [...document.querySelectorAll("article.episode")].map((a) => [a.dataset.id,
    [...a.querySelectorAll("img")].map((img) => [Number(img.dataset.image), img.complete, img.naturalWidth,
                                                 img.naturalHeight])]);
})()"""

BOXES_JS = """[...document.querySelectorAll("article.episode .frame svg rect")].map((rect) => {
  const img = rect.closest(".frame").querySelector("img"), r = rect.getBoundingClientRect(),
        i = img.getBoundingClientRect();
  return { episode: rect.closest("article").dataset.id, images: rect.dataset.images.split(",").map(Number),
           box: ["x", "y", "width", "height"].map((k) => Number(rect.getAttribute(k))),
           client: [r.left - i.left, r.top - i.top, r.width, r.height], scale: i.width / img.naturalWidth };
})"""


def test_page_shows_images_and_boxes_as_the_trajectories_say(
        browser: Browser, rollout: tuple[Path, list[Trajectory]], shots: Path) -> None:
    report, trajectories = rollout
    browser.open(report)
    assert browser.js("document.getElementById('count').dataset.matching") == str(len(trajectories)) == "48"
    on_page = trajectories[:PAGE_SIZE]
    by_id = {t.episode_id: t for t in trajectories}

    # Every image of the episodes on the page, decoded at the size the model saw.
    shown = browser.js(IMAGES_JS)
    assert [episode for episode, _ in shown] == [t.episode_id for t in on_page]
    for episode, images in shown:
        want = [[n, True, im.pixels.shape[2], im.pixels.shape[1]] for n, im in enumerate(by_id[episode].images)]
        assert sorted(images) == want

    # Every zoom box, on its question image, where the trajectory puts it.
    drawn = browser.js(BOXES_JS)
    boxes = {(d["episode"], n): d for d in drawn for n in d["images"]}
    want = {(t.episode_id, n): box for t in on_page for n, box in expected_boxes(t).items()}
    assert len(want) >= 5 and boxes.keys() == want.keys()
    for key, (x1, y1, x2, y2) in want.items():
        got = boxes[key]
        assert got["box"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
        s = got["scale"]  # CSS pixels per image pixel
        assert got["client"] == pytest.approx([x1 * s, y1 * s, (x2 - x1) * s, (y2 - y1) * s], abs=0.6)

    # The first box's left edge, in the screenshot, has the box's colour.
    rect = browser.js("""(() => { const r = document.querySelector(".frame svg rect");
        r.scrollIntoView({ block: "center" }); const b = r.getBoundingClientRect();
        return [b.left, b.top, b.height, getComputedStyle(r).stroke]; })()""")
    left, top, height, stroke = rect
    colour = np.array([int(c) for c in stroke[stroke.index("(") + 1:-1].split(",")])
    pixels = np.asarray(browser.screenshot(), dtype=int)
    x, y = round(left), round(top + height / 2)
    edge = pixels[y - 1:y + 2, x - 2:x + 3].reshape(-1, 3)
    assert np.abs(edge - colour).sum(axis=1).min() < 40, (edge, colour)

    browser.js("window.scrollTo(0, 0)")
    browser.viewport(1280, 2400)
    browser.screenshot().save(shots / "view-report.png")
    browser.viewport(1280, 1000)
    assert browser.errors() == []


def listed(browser: Browser) -> tuple[int, list[str]]:
    """The number of matching episodes and the ids on the page."""
    count, ids = browser.js("""[Number(document.getElementById("count").dataset.matching),
        [...document.querySelectorAll("article.episode")].map((a) => a.dataset.id)]""")
    return count, ids


def choose(browser: Browser, select: str, value: str) -> tuple[int, list[str]]:
    browser.js(f"""(() => {{ const s = document.getElementById({json.dumps(select)});
        s.value = {json.dumps(value)}; s.dispatchEvent(new Event("change")); }})()""")
    return listed(browser)


def search(browser: Browser, text: str) -> None:
    browser.js(f"""(() => {{ const s = document.getElementById("f-text"); s.value = {json.dumps(text)};
        s.dispatchEvent(new Event("input")); }})()""")


def test_filters_and_pages(browser: Browser, rollout: tuple[Path, list[Trajectory]]) -> None:
    report, trajectories = rollout
    browser.open(report)
    by_id = {t.episode_id: t for t in trajectories}
    calls = {t.episode_id: sum(len(turn.tool_calls) for turn in t.turns) for t in trajectories}
    checks = [
        ("f-dataset", "slake", lambda t: t.dataset == "slake"),
        ("f-outcome", "correct", lambda t: t.score >= 0.5),
        ("f-outcome", "incorrect", lambda t: t.score < 0.5),
        ("f-state", "error", lambda t: t.status.startswith("error")),
        ("f-qtype", "multiple_choice", lambda t: t.gold == "B"),
        ("f-calls", "0", lambda t: calls[t.episode_id] == 0),
        ("f-calls", "1", lambda t: calls[t.episode_id] == 1),
    ]
    for select, value, keep in checks:
        want = [t.episode_id for t in trajectories if keep(t)]
        assert 0 < len(want) < len(trajectories), (select, value)  # the rollout covers both sides
        assert choose(browser, select, value) == (len(want), want[:PAGE_SIZE]), (select, value)
        choose(browser, select, "")
    assert listed(browser)[0] == len(trajectories)

    # Filters combine; the search box finds episodes by id.
    choose(browser, "f-dataset", "vqa-rad")
    count, ids = choose(browser, "f-outcome", "incorrect")
    assert count == sum(t.dataset == "vqa-rad" and t.score < 0.5 for t in trajectories)
    assert all(by_id[i].dataset == "vqa-rad" and by_id[i].score < 0.5 for i in ids)
    choose(browser, "f-dataset", "")
    choose(browser, "f-outcome", "")
    target = trajectories[30].episode_id
    search(browser, target)
    want = [t.episode_id for t in trajectories if target in t.episode_id]  # "g1-2" finds "g11-2" too
    assert listed(browser) == (len(want), want)
    malformed = next(t for t in trajectories if any("not valid JSON" in turn.observation for turn in t.turns))
    search(browser, malformed.episode_id)
    article = f"article[data-id={json.dumps(malformed.episode_id)}]"
    listed_calls = browser.js(f"document.querySelector({json.dumps(article)}).querySelector('ul.calls').innerText")
    assert "✗ tool call 1: not valid JSON" in listed_calls
    search(browser, "")

    # Pages: 48 episodes are 20 + 20 + 8.
    pages = []
    for _ in range(3):
        pages.append(listed(browser)[1])
        assert browser.js("document.getElementById('prev').disabled") == (len(pages) == 1)
        browser.js("document.getElementById('next').click()")
    assert [len(p) for p in pages] == [20, 20, 8] and sum(pages, []) == [t.episode_id for t in trajectories]
    assert browser.js("document.getElementById('next').disabled") is True
    assert browser.errors() == []


# --------------------------------------------------------------------------- 5,000 episodes


def synthetic(n: int, side: int = 64, seed: int = 0) -> Iterator[Trajectory]:
    """GRPO groups of 8 over four real images shown at side x side, with 0-3 zooms of side x side."""
    rng = random.Random(seed)
    sources = [Image.fromarray(a).convert("RGB") for a in (skimage.data.camera(), skimage.data.astronaut(),
                                                           skimage.data.immunohistochemistry(), skimage.data.moon())]

    def pixels(source: Image.Image, box: tuple[float, ...] | None = None) -> torch.Tensor:
        image = source.resize((side, side), Image.Resampling.BILINEAR, box=box)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()

    datasets, golds = ("slake", "vqa-rad", "pathvqa", "pmc-vqa"), ("yes", "no", "B", "left lung")
    for g in range(n // 8):
        source = sources[g % 4]
        w, h = source.size
        question = ImageRecord(pixels(source), 0, f"source-{g % 4}.png", 0, (0.0, 0.0, float(w), float(h)))
        for k in range(8):
            t = Trajectory(f"g{g}-{k}", f"g{g}", k, f"task-{g}", datasets[g % 4], f"Question {g}?", golds[g % 4])
            t.images = [question]
            for turn in range(1, rng.choice((0, 1, 1, 2, 3)) + 1):
                bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.1, 0.6) * h
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                t.images.append(ImageRecord(pixels(source, (x, y, x + bw, y + bh)), turn, question.source, 0,
                                            (x, y, x + bw, y + bh)))
                shown = [round(v * side / w) for v in (x, y, x + bw, y + bh)]
                t.turns.append(TurnRecord(f"<think>closer</think>\n<tool_call>{shown}</tool_call>", "stop", 40, 300,
                                          0.3, 0.01, [ToolCallRecord("zoom_in", {"bbox_2d": shown}, True)]))
            t.answer = rng.choice((golds[g % 4], "no", None))
            t.turns.append(TurnRecord(f"<answer>{t.answer}</answer>", "stop", 9, 500, 0.1))
            t.score = t.reward = float(t.answer == t.gold)
            t.status = rng.choice(("ok",) * 8 + ("truncated", "timeout"))
            yield t


FILTER_JS = """(async () => {
  const s = document.getElementById("f-outcome"), t0 = performance.now();
  s.value = "incorrect";
  s.dispatchEvent(new Event("change"));
  await new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));  // painted
  const painted = performance.now() - t0;
  await Promise.all([...document.images].map((img) => img.decode()));
  return [painted, performance.now() - t0, Number(document.getElementById("count").dataset.matching)];
})()"""


def test_five_thousand_episodes_open_and_filter_quickly(
        browser: Browser, tmp_path: Path, shots: Path, record_property: pytest.RecordProperty) -> None:
    path, report = tmp_path / "5k.parquet", tmp_path / "5k.html"
    with TrajectoryWriter(path) as writer:
        writer.write_many(synthetic(5000))
    start = time.perf_counter()
    built = build_report([path], report)
    build_s = time.perf_counter() - start
    incorrect = sum(score < 0.5 for score in pq.read_table(path, columns=["score"])["score"].to_pylist())

    load_s = browser.open(report)
    first_ms = browser.js("performance.getEntriesByName('view:first-render')[0].startTime")
    images_ms = browser.js("Promise.all([...document.images].map((img) => img.decode())).then(() => performance.now())")
    painted_ms, decoded_ms, matching = browser.js(FILTER_JS)
    numbers = {"episodes": built.episodes, "distinct_images": built.images, "file_mb": round(built.bytes / 1e6, 1),
               "build_s": round(build_s, 2), "load_event_s": round(load_s, 3), "first_render_ms": round(first_ms),
               "first_page_images_ms": round(images_ms), "filter_painted_ms": round(painted_ms),
               "filter_images_ms": round(decoded_ms)}
    for key, value in numbers.items():
        record_property(key, value)
    (shots / "view-5k-timings.json").write_text(json.dumps(numbers, indent=1))
    print(numbers)
    assert matching == incorrect and browser.errors() == []
    assert first_ms < 5000 and painted_ms < 1000 and built.bytes < 150e6
