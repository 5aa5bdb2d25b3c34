"""`diffcli report FOLDER`: one self-contained HTML page for a run or a sweep, checked in a real headless browser
(Chromium from the system packages): the page is opened, sorted by a score, and what it shows is read back from
the browser's DOM. Where Chromium is missing the browser checks skip, except under CI (`DIFFCLI_CI=1`, set by
.ci/run, which installs Chromium), where they fail."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from conftest import call_cli, invoke_cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("DIFFCLI_CI") == "1":
        pytest.fail("Chromium is missing; .ci/run installs it (apt-get install chromium) before the tests")
    pytest.skip("no Chromium here (apt-get install chromium); CI runs this test")


def rendered(page, fragment: str = "") -> str:
    """The page's DOM after Chromium loaded it and ran its script (`#sort=...` sorts as a click does)."""
    proc = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri() + fragment],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


class Rows(HTMLParser):
    """The settings table as the browser left it: each row's data-folder and its cells' data-value, in order; the
    table's data-sorted; every <img> src."""

    def __init__(self) -> None:
        super().__init__()
        self.rows, self.sorted, self.images, self.inside = [], None, [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "settings":
            self.sorted, self.inside = a.get("data-sorted"), True
        elif tag == "tr" and self.inside and "data-folder" in a:
            self.rows.append((a["data-folder"], []))
        elif tag == "td" and self.inside and self.rows and "data-value" in a:
            self.rows[-1][1].append(a["data-value"])
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False


def parse(text: str) -> Rows:
    rows = Rows()
    rows.feed(text)
    return rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real sweep of the shipped digit model over three CFG scales, scored with the digit classifier."""
    out = tmp_path_factory.mktemp("report") / "cfg-sweep"
    call_cli("sweep", "sample", "--n", "2", "--steps", "1", "--labels", "1,7", "--sampler", "euler", "--device", "cpu",
             "--grid", "cfg=1,2,4", "--score", "digits", "--out", out, check=True)
    return out


def test_sweep_report_sorts_by_each_score_in_a_browser(sweep, capsys):
    from diffcli.shared.image_settings import read_settings
    assert read_settings(sweep / "grid.png")["command"] == "sweep"  # the sweep's figures carry the sweep's settings
    assert read_settings(sweep / "plot.png")["argv"][:3] == ["diffcli", "sweep", "sample"]
    setting = read_settings(next(sweep.glob("cfg-*/00000-*.png")))
    assert setting["command"] == "sample" and "--cfg" in setting["argv"]  # a setting's images, the setting's
    code, out, err = invoke_cli(["report", str(sweep)], capsys)
    assert code == 0, err
    page = sweep.with_name("cfg-sweep.report.html")
    assert f"wrote {page}" in out and not (sweep / "cfg-sweep.report.html").exists()
    results = json.loads((sweep / "results.json").read_text())
    similarity = {r["folder"]: r["scores"]["similarity"] for r in results["rows"]}
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: nothing is fetched
    before = parse(rendered(page))
    assert before.sorted is None and [f for f, _ in before.rows] == [r["folder"] for r in results["rows"]]
    assert len(before.images) == 3 + 2 and all(s.startswith("data:image/png;base64,") for s in before.images)
    for fragment, reverse in (("#sort=similarity", False), ("#sort=-similarity", True)):
        shown = parse(rendered(page, fragment))
        assert shown.sorted == f"similarity {'desc' if reverse else 'asc'}"
        assert [f for f, _ in shown.rows] == sorted(similarity, key=similarity.get, reverse=reverse)
    shown = parse(rendered(page, "#sort=-cfg"))  # a setting column sorts as numbers
    assert [cells[0] for _, cells in shown.rows] == ["4", "2", "1"]


def test_run_report_shows_images_settings_and_scores(sweep, tmp_path, capsys):
    run = next(p for p in sorted(sweep.iterdir()) if p.is_dir())  # a setting's folder: a run with its eval.json
    page = tmp_path / "run.html"
    code, out, err = invoke_cli(["report", str(run), "--out", str(page)], capsys)
    assert code == 0, err
    text = rendered(page)
    assert "Command line: <code>diffcli sample --n 2 --steps 1" in text
    figures = re.findall(r'<figure class="(sample|figure)" data-file="([^"]+)"', text)
    assert ("sample", "00000-seed0-label1.png") in figures and ("sample", "00001-seed1-label7.png") in figures
    assert ("figure", "grid.png") in figures
    assert "seed: 1<br>label: 7" in text and "<th>accuracy</th>" in text
    assert text.count("data:image/png;base64,") == len(figures)
    code, _, err = invoke_cli(["report", str(run), "--out", str(page)], capsys)  # never replaced unasked
    assert code == 2 and "exists" in err
    code, _, err = invoke_cli(["report", str(run), "--out", str(run / "r.html")], capsys)
    assert code == 2 and "beside the folder" in err
    code, _, err = invoke_cli(["report", str(tmp_path / "nothing")], capsys)
    assert code == 2 and err.count("\n") == 1
