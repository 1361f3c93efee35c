"""`unipelt-report --html`: one self-contained page with every table and figure, checked in a real headless
browser (Chromium); single-seed cells show no std."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from unipelt.report import cli

TASKS = ["rte", "sst2"]
METHODS = {"lora": 0.6, "adapter": 0.62, "unipelt_apl": 0.65, "unipelt_apl_nogate": 0.63}
SEEDS = [11, 22, 33]
LAYERS = 3


def _record(task, method, k, seed, score, gates=None):
    return {"schema_version": 1, "status": "complete", "run_id": f"{task}-{method}-k{k}-d{seed}-s42", "task": task,
            "method": method, "model": "minilm", "k": k, "data_seed": seed, "seed": 42, "main_metric": "accuracy",
            "dev_score": 0.5, "test_score": score, "params": {"trainable": 1000, "percent": 0.1},
            "time": {"train_epoch_s": 2.0, "train_step_s": 0.1, "inference_per_example_s": 0.001},
            "memory": {"peak_bytes": 2**27, "device": "cpu"}, "gates": gates or {}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(1)
    scores = {}
    for k in (100, 1000):
        for method, base in METHODS.items():
            for task in TASKS:
                for seed in SEEDS:
                    score = float(base + rng.normal(0, 0.02))
                    gates = ({"adapter_ffn": rng.uniform(0, 1, LAYERS).tolist(),
                              "prefix": rng.uniform(0, 1, LAYERS).tolist()} if method == "unipelt_apl" else None)
                    rec = _record(task, method, k, seed, score, gates)
                    (root / rec["run_id"]).mkdir()
                    (root / rec["run_id"] / "record.json").write_text(json.dumps(rec))
                    scores.setdefault((task, method, k), []).append(score)
    single = _record("sst2", "bitfit", 100, 11, 0.5)  # one seed only: its cell must show no std
    (root / single["run_id"]).mkdir()
    (root / single["run_id"] / "record.json").write_text(json.dumps(single))
    return {"root": root, "scores": scores}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([str(runs["root"]), "--out", str(out), "--html", "--expected-seeds", "3"]) == 0
    return out


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_single_seed_cell_shows_no_std(report, runs):
    md = (report / "main_table.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| bitfit"))
    assert "50.0*" in row and "(0.0)" not in row
    lora = next(line for line in md.splitlines() if line.startswith("| lora"))
    std = 100 * statistics.stdev(runs["scores"][("rte", "lora", 100)])
    assert f"({std:.1f})" in lora  # several seeds: mean (std) as before


def test_html_page_is_self_contained_with_every_table_and_figure(report, runs):
    page = (report / "report.html").read_text()
    parser = _Page()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    # nothing is fetched from elsewhere: no links, scripts or remote/relative images
    assert "link" not in tags and "script" not in tags
    imgs = [a for t, a in parser.tags if t == "img"]
    pngs = sorted(report.glob("*.png"))
    assert len(pngs) >= 4 and len(imgs) == len(pngs)  # score_vs_k, per task, gates per task
    embedded = sorted(base64.b64decode(a["src"].split(",", 1)[1]) for a in imgs)
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert embedded == sorted(p.read_bytes() for p in pngs)  # each figure's PNG, byte for byte
    # every table of the folder: main (2 K blocks), headline (2), ablation (2), efficiency, failed, skipped
    titles = [m for m in re.findall(r"<h2>(.*?)</h2>", page)]
    for title in ("Main results", "Headline: unipelt_apl vs single methods", "Ablation: learned vs fixed gates",
                  "Failed runs", "Skipped files", "Figures"):
        assert title in titles, title
    assert any(t.startswith("Efficiency") for t in titles)
    assert tags.count("table") >= 9
    text = " ".join(parser.text)
    mean = 100 * statistics.mean(runs["scores"][("sst2", "adapter", 1000)])
    assert f"{mean:.1f}" in text
    assert "(0.0)" not in page  # the single-seed bitfit cell


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => ({w: i.naturalWidth, h: i.naturalHeight, ok: i.complete,
                                             shown: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll("table")].map(t => ({rows: t.rows.length,
                                                                    w: t.getBoundingClientRect().width}));
  const pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = JSON.stringify({imgs, tables});
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args, timeout=90):
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_html_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    page = (report / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the page plus a script that reports what the browser rendered
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, f"no probe output; chromium said: {dom.stderr[-2000:]}"
    seen = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(seen["imgs"]) == len(list(report.glob("*.png")))
    for img in seen["imgs"]:  # decoded (naturalWidth > 0) and laid out
        assert img["ok"] and img["w"] > 100 and img["h"] > 100 and img["shown"] > 100, img
    assert len(seen["tables"]) >= 9 and all(t["rows"] >= 1 and t["w"] > 50 for t in seen["tables"])
    shot = tmp_path / "shot.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", (report / "report.html").as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    non_white = (pixels < 245).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert non_white > 0.02 and colours > 50, (non_white, colours)  # text, table rules and plot colours
