"""The self-contained HTML report: structure, no network resources, and a headless-Chromium screenshot."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GPT2Config, GPT2Model

from attnkit.analyze import analyze, to_html
from attnkit.analyze.html import _COLORS

_CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


@pytest.fixture(scope="module")
def report():
    config = GPT2Config(n_embd=128, n_head=4, n_layer=2, n_positions=128, use_cache=False, attn_implementation="sdpa")
    inputs = {"input_ids": torch.randint(0, 99, (2, 64)), "use_cache": False}
    return analyze(GPT2Model(config).eval(), (), inputs, hardware="h100", dtype=torch.bfloat16, name="tiny-gpt2")


@pytest.fixture(scope="module")
def page(report, tmp_path_factory):
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(to_html(report))
    return path


def test_page_has_the_plot_tables_and_no_network_resources(report, page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count('<svg id="roofline"') == 1
    plotted = [k for k in report.mode("attention-aware").kernels if k.flops > 0]
    assert text.count('class="kernel"') == len(plotted) > 0
    assert text.count('class="ceiling"') == 3
    assert "<h2 id='attention'>Attention (2 sites)</h2>" in text and "h.1.attn" in text
    assert "Predicted time per layer" in text and "h.0" in text
    assert not re.search(r"https?://|<script|<link|<img|@import|url\(", text), "the page must not fetch anything"


@pytest.mark.skipif(_CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")
def test_chromium_screenshot_shows_the_roofline(page, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([_CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                   check=True, capture_output=True, timeout=60)
    image = Image.open(shot).convert("RGB")
    pixels = np.asarray(image, dtype=np.int32)
    for category in ("gemm", "attention"):  # only the plot uses these colours (points; attention's ceiling)
        color = np.array([int(_COLORS[category][i:i + 2], 16) for i in (1, 3, 5)])
        near = int((np.abs(pixels - color).sum(axis=-1) < 40).sum())
        assert near > 50, f"no {category} points visible in the screenshot"
