"""`flywheel report`: one self-contained HTML page from a run's local files, checked in headless Chromium."""

import os
import re
import shutil
import subprocess

import pytest

from flywheel.report import write_report

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_the_report_is_self_contained_and_shows_its_plots_in_a_browser(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    page = write_report(run_dir).read_text()
    for title in ("Held-out success per policy version", "Detector success, claimed against audited",
                  "Promotion gate decisions", "Throughput, time per phase, and pipeline waits",
                  "Newest policy, in practice"):
        assert title in page
    sources = re.findall(r"<img[^>]* src='([^']*)'", page)
    assert len(sources) >= 6 and all(s.startswith("data:image/") for s in sources)  # nothing to fetch
    assert "http://" not in page and "https://" not in page
    if BROWSER is None:
        if os.environ.get("FLYWHEEL_REQUIRE_BROWSER"):
            pytest.fail("no Chromium to load the report in: apt-get install chromium (.ci/run does)")
        pytest.skip("no Chromium here (apt-get install chromium); CI installs it and runs this check")
    dom = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (run_dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    # the page loaded and the browser decoded every image on it: the plots and the rollout clips
    assert f'data-images="{len(sources)}"' in body and f'data-decoded="{len(sources)}"' in body, body


def test_a_run_killed_before_its_summary_still_gets_a_report(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    (run_dir / "summary.json").unlink()
    page = write_report(run_dir).read_text()
    assert "running or killed" in page and "Held-out success per policy version" in page
