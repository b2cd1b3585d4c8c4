"""`sinstudy plot`, `report` and `dashboard` on a real study, the dashboard in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import TINY_TOML, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # git-ignored


@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """12 complete trials (no pruning) made by the CLI: enough for importances."""
    folder = tmp_path_factory.mktemp("outputs")
    (folder / "tiny.toml").write_text(TINY_TOML)
    r = run_cli(
        "run",
        "--config",
        "tiny.toml",
        "--max-epochs",
        "6",
        "--no-progress",
        "--pruner",
        "none",
        "--n-trials",
        "12",
        cwd=folder,
    )
    assert r.returncode == 0, r.stderr
    return folder


def test_plot_writes_html_and_png_including_importance_parallel_and_fit(studied):
    r = run_cli("plot", cwd=studied)
    assert r.returncode == 0, r.stderr
    # Optuna's log and warnings stay out
    assert "[W " not in r.stderr and "Warning" not in r.stderr, r.stderr
    out = studied / "storage/plots/sinstudy"
    html = {p.stem for p in out.glob("*.html")}
    assert len(html) >= 6
    assert {
        "importance_ped_anova",
        "importance_fanova",
        "parallel_coordinate",
        "fit",
        "history",
        "intermediate_values",
        "contour_lr_depth",
        "contour_lr_width",
    } <= html
    assert (out / "plotly.min.js").exists()  # beside the pages: they open offline
    listed = [line.strip() for line in r.stdout.splitlines()[1:]]
    # the count is what is there
    assert f"wrote {len(listed)} files" in r.stdout and sorted(listed) == sorted(
        p.name for p in out.iterdir()
    )
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: PNG export is untested (apt-get install chromium)"
        )
    for stem in html:
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem


def test_plot_with_one_evaluator_and_no_png(studied, tmp_path):
    r = run_cli(
        "plot", "--evaluator", "fanova", "--no-png", "--out", str(tmp_path / "p"), cwd=studied
    )
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (tmp_path / "p").iterdir()}
    assert "importance_fanova.html" in names and "importance_ped_anova.html" not in names
    assert not any(n.endswith(".png") for n in names)


def test_report_is_one_offline_html_file(studied, tmp_path):
    out = tmp_path / "r.html"
    r = run_cli("report", "--out", str(out), cwd=studied)
    assert r.returncode == 0, r.stderr
    assert "[W " not in r.stderr and "Warning" not in r.stderr, r.stderr
    text = out.read_text()
    study = optuna.load_study(
        study_name="sinstudy", storage=f"sqlite:///{studied}/storage/sinstudy.db"
    )
    assert not re.search(r"<script[^>]*\ssrc=", text)  # every script inline: nothing fetched
    assert "plotly.js v" in text  # the library itself is inside
    assert text.count("Plotly.newPlot") >= 5
    assert "PED-ANOVA" in text and "fANOVA" in text and "Top 10 trials" in text
    assert "<th>compute s</th>" in text  # each trial's share of the device beside "seconds"
    assert f"#{study.best_trial.number}" in text
    assert text.count("<tr>") >= 1 + 10 + 4  # summary rows, top-10 rows, importance rows
    assert "<th></th>" not in text  # the summary is a key-value table, no empty header row


@pytest.mark.parametrize("cmd", ["plot", "report"])
def test_unknown_or_empty_study_is_a_clean_error(studied, tmp_path, cmd):
    shutil.copytree(studied, tmp_path, dirs_exist_ok=True)
    r = run_cli(cmd, "--study", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "no study 'nope'" in r.stderr and "Traceback" not in r.stderr
    optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path}/storage/sinstudy.db")
    r = run_cli(cmd, "--study", "empty", cwd=tmp_path)
    assert (
        r.returncode == 2
        and "Traceback" not in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    ), r.stderr


def test_run_leaves_a_study_note_and_a_fit_image_on_the_best_trial(studied):
    study = optuna.load_study(
        study_name="sinstudy", storage=f"sqlite:///{studied}/storage/sinstudy.db"
    )
    from optuna_dashboard._note import get_note_from_system_attrs

    note = get_note_from_system_attrs(
        study._storage.get_study_system_attrs(study._study_id), None
    )["body"]
    assert f"Best trial #{study.best_trial.number}" in note and "fANOVA" in note
    metas = optuna.artifacts.get_all_artifact_meta(study.best_trial, storage=study._storage)
    assert {m.mimetype for m in metas} == {"application/octet-stream", "image/png"}
    fit_id = next(m.artifact_id for m in metas if m.mimetype == "image/png")
    assert (studied / "storage/artifacts" / fit_id).read_bytes()[:4] == b"\x89PNG"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_in_a_real_browser(studied):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "study", "dashboard", "--port", str(port)],
        cwd=studied,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=2))[
                    "study_summaries"
                ]
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (
                    server.stdout.read() if server.poll() is not None else "timeout"
                )
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["sinstudy"]
        study_id = studies[0]["study_id"]
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-first-run",
                    "--disable-sync",
                    "--disable-quic",
                ],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{base}/dashboard/studies/{study_id}")
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30000)  # a plot rendered
            page.wait_for_function(
                "document.body.innerText.includes('Best Trial (number=')", timeout=30000
            )
            body = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"), full_page=True)
            page.goto(f"{base}/dashboard/studies/{study_id}/trials")
            page.wait_for_function("document.body.innerText.includes('Trial 11')", timeout=30000)
            trials_text = page.inner_text("body")
            # the best trial was the best when it finished: its fit image shows among its artifacts
            best = optuna.load_study(
                study_name="sinstudy", storage=f"sqlite:///{studied}/storage/sinstudy.db"
            ).best_trial.number
            page.get_by_text(f"Trial {best}", exact=True).first.click()
            page.wait_for_selector("img[src*='/artifacts/']", timeout=30000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-trials.png"), full_page=True)
            # the trial page keeps the window's width: no attr stretches it sideways
            width = page.evaluate("document.documentElement.scrollWidth")
            browser.close()
        study = optuna.load_study(
            study_name="sinstudy", storage=f"sqlite:///{studied}/storage/sinstudy.db"
        )
        assert f"Best Trial (number={study.best_trial.number})" in body, body[body.find("Best") :][
            :200
        ]
        assert (
            "12 Trials" in trials_text and "Trial 0" in trials_text and "Trial 11" in trials_text
        )
        assert width <= 1400, f"the trial page is {width} px wide"
        assert "val_mse" in body  # the value's name, not "Objective 0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def _as_reader(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`args` as a user who may not write the storage: root here keeps to the file modes
    (CAP_DAC_OVERRIDE dropped), anyone else does anyway."""
    import os

    drop = []
    if os.geteuid() == 0:
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    return subprocess.run([*drop, *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_readers_read_a_storage_they_may_not_write(studied, tmp_path, kind):
    """best, plot and report on a read-only file in a read-only folder, as plain Optuna reads
    it: they open it read-only (not "make it writable") and it stays as it was."""
    from study.store import parse

    src = f"sqlite:///{studied}/storage/sinstudy.db"
    ro = tmp_path / "ro"
    ro.mkdir()
    if kind == "sqlite":
        shutil.copy(studied / "storage/sinstudy.db", ro / "s.db")
        url = f"sqlite:///{ro / 's.db'}"
    else:
        url = f"journal:///{ro / 's.log'}"
        optuna.copy_study(
            from_study_name="sinstudy",
            from_storage=src,
            to_storage=optuna.storages.JournalStorage(
                optuna.storages.journal.JournalFileBackend(str(ro / "s.log"))
            ),
        )
    db = parse(url).path
    (ro / "s.log.lock").unlink(missing_ok=True)
    before = db.read_bytes()
    db.chmod(0o444)
    ro.chmod(0o555)
    try:
        probe = _as_reader(sys.executable, "-c", "open('ro/x', 'w')", cwd=tmp_path)
        assert "PermissionError" in probe.stderr  # the reader cannot write there
        cli = (sys.executable, "-m", "study")
        work = tmp_path / "work"
        # the copy left its artifacts behind: the readers are told where they are
        shutil.copytree(studied / "storage/artifacts", work / "art")
        best = _as_reader(*cli, "best", "--storage", url, cwd=work)
        assert best.returncode == 0 and "#" in best.stdout, best.stderr
        art = ("--artifact-dir", "art")
        report = _as_reader(*cli, "report", "--storage", url, *art, "--out", "r.html", cwd=work)
        assert report.returncode == 0 and (work / "r.html").stat().st_size, report.stderr
        plot = _as_reader(*cli, "plot", "--storage", url, *art, "--no-png", "--out", "p", cwd=work)
        assert plot.returncode == 0 and list((work / "p").glob("*.html")), plot.stderr
        assert sorted(p.name for p in ro.iterdir()) == [db.name]
        assert db.read_bytes() == before
    finally:
        ro.chmod(0o755)
