"""Bad input and damaged storage: one line, the right exit code, nothing stored changed, nothing
written outside storage/, no secret shown; a cut journal repaired without losing a trial."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY_TOML, run_cli, start_cli

TINY = ["--config", "tiny.toml", "--max-epochs", "4", "--no-progress"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("made")
    (folder / "tiny.toml").write_text(TINY_TOML)
    r = run_cli("run", *TINY, "--n-trials", "4", "--slots", "2", cwd=folder)
    assert r.returncode == 0, r.stderr
    return folder


@pytest.fixture
def study_dir(made, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(made, folder)
    (folder / "afile").write_text("a file, not a folder\n")
    configs = {
        "huge.toml": "[data]\nn_train = 99999999999999999999\n",
        "float_seed.toml": "[data]\nseed = 1e20\n",
        "wide.toml": "[search_space]\nwidth = [8, 100000000]\n",
        "too_big.toml": "[search_space]\nwidth = [8, 4096]\ndepth = [1, 64]\n",
        "log_under_file.toml": TINY_TOML + '\n[study]\nlog_dir = "afile/tb"\n',
        "art_under_file.toml": TINY_TOML + '\n[study]\nartifact_dir = "afile/art"\n',
        "nowait.toml": TINY_TOML + "\n[study]\nstorage_outage = 0\n",
    }
    for name, text in configs.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--study", "../../escaped"], 2, "not a plain name"),
        (["--study", "/tmp/absolute-study"], 2, "not a plain name"),
        (["--study", "x" * 10_000], 2, "not a plain name"),
        (["--study", "tab\there"], 2, "not a plain name"),
        (["--config", "huge.toml"], 2, "data.n_train must be an integer from 2 to"),
        (["--config", "float_seed.toml"], 2, "data.seed must be an integer"),
        (["--config", "wide.toml"], 2, "search_space.width must end at <= 4,096"),
        (["--config", "too_big.toml"], 2, "lower search_space.depth / width or --slots"),
        (["--seed", "4294967296"], 2, "seed must be an integer from 0 to 2,147,483,647"),
        (["--config", "log_under_file.toml"], 1, "set [study] log_dir to a writable folder"),
        (["--config", "art_under_file.toml"], 1, "set [study] artifact_dir to a writable folder"),
        (["--storage", "sqlite:///storage/other.db"], 2, "TensorBoard folder"),  # beside it
        (
            # storage_outage = 0: a server that refuses is not waited for (see the next test)
            [
                "--config",
                "nowait.toml",
                "--storage",
                "postgresql://postgres:s3cret@127.0.0.1:9/test",
            ],
            1,
            "cannot connect to PostgreSQL",
        ),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(study_dir, args, code, fragment):
    db = study_dir / "storage/sinstudy.db"
    before, tree = _digest(db), _tree(study_dir)
    r = run_cli("run", "--no-progress", "--n-trials", "1", *args, cwd=study_dir)
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "s3cret" not in r.stderr
    assert _digest(db) == before
    assert _tree(study_dir) == tree  # nothing created: no study, no folder, no other storage


def test_a_server_that_refuses_at_start_is_waited_for_with_a_line_first_and_ctrl_c_ends_it(
    study_dir,
):
    """A server down or restarting is waited for ([study] storage_outage, 5 min by default):
    the run says so at once, so a mistyped port is seen; Ctrl-C ends the wait as it ends a run
    (exit 130), nothing written."""
    db = study_dir / "storage/sinstudy.db"
    before, tree = _digest(db), _tree(study_dir)
    url = "postgresql://postgres:s3cret@127.0.0.1:9/test"
    proc = start_cli("run", "--no-progress", "--n-trials", "1", "--storage", url, cwd=study_dir)
    try:
        first = proc.stderr.readline()
        assert "sinstudy: storage unavailable: cannot connect to PostgreSQL at " in first, first
        assert "the run starts when it answers, for up to 5 min 0 s" in first, first
        time.sleep(1)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = rest.strip().splitlines()
    assert proc.returncode == 130 and lines == ["sinstudy: interrupted"], rest
    assert "Traceback" not in rest and "s3cret" not in first + rest
    assert _digest(db) == before and _tree(study_dir) == tree


def test_a_study_with_other_objectives_is_refused(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    optuna.create_study(
        study_name="sinstudy",
        storage=f"sqlite:///{tmp_path}/m.db",
        directions=["minimize", "minimize"],
    )
    before = _digest(tmp_path / "m.db")
    r = run_cli("run", *TINY, "--n-trials", "1", "--storage", "sqlite:///m.db", cwd=tmp_path)
    assert (
        r.returncode == 2
        and "2 objectives" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    ), r.stderr
    assert _digest(tmp_path / "m.db") == before


def test_a_damaged_sqlite_page_is_refused_before_use(made, tmp_path):
    db = tmp_path / "d.db"
    data = bytearray((made / "storage/sinstudy.db").read_bytes())
    data[4096 * 2] = 0xAB  # the type byte of page 3's b-tree header
    db.write_bytes(bytes(data))
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    r = run_cli("run", *TINY, "--n-trials", "1", "--storage", "sqlite:///d.db", cwd=tmp_path)
    assert (
        r.returncode == 2
        and "damaged SQLite database" in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    ), r.stderr
    assert db.read_bytes() == bytes(data)


def test_an_upper_case_scheme_works(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    r = run_cli("run", *TINY, "--n-trials", "2", "--storage", "SQLITE:///x.db", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (
        len(optuna.load_study(study_name="sinstudy", storage=f"sqlite:///{tmp_path}/x.db").trials)
        == 2
    )


def test_a_journal_cut_mid_record_is_repaired_with_a_copy_and_loses_no_trial(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    url = "journal:///storage/s.log"
    assert (
        run_cli(
            "run", *TINY, "--n-trials", "4", "--slots", "2", "--storage", url, cwd=tmp_path
        ).returncode
        == 0
    )
    log = tmp_path / "storage/s.log"
    whole = log.read_bytes()
    # a record cut off mid-write
    cut = whole + b'{"op_code": 5, "worker_id": "x", "trial_id": 1, "us'
    log.write_bytes(cut)
    r = run_cli("run", *TINY, "--n-trials", "2", "--slots", "2", "--storage", url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "was cut off" in r.stderr and "Traceback" not in r.stderr
    backup = next((tmp_path / "storage").glob("s.log.partial-*.bak"))
    assert backup.read_bytes() == cut
    assert log.read_bytes().startswith(whole) and log.read_bytes().endswith(b"\n")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(log)))
    trials = optuna.load_study(study_name="sinstudy", storage=storage).trials
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)


def test_a_password_is_never_stored_printed_or_served(tmp_path, pg_url):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    # trust auth: any password is accepted
    url = pg_url.replace("postgres@", "postgres:s3cret@", 1)
    r = run_cli("run", *TINY, "--n-trials", "2", "--storage", url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "s3cret" not in r.stdout + r.stderr and "postgres:***@" in r.stdout
    study = optuna.load_study(study_name="sinstudy", storage=pg_url)
    assert "s3cret" not in json.dumps(study.user_attrs) and "***" in study.user_attrs["config"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_refuses_bad_ports_and_warns_about_an_open_host(made):
    for port, code in (("70000", 2), ("-1", 2), ("0", 2)):
        r = run_cli("dashboard", "--port", port, cwd=made)
        assert (
            r.returncode == code
            and len(r.stderr.strip().splitlines()) == 1
            and "--port" in r.stderr
        ), r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_cli("dashboard", "--port", str(taken.getsockname()[1]), cwd=made)
    assert (
        r.returncode == 1 and "choose another --port" in r.stderr and "http://" not in r.stdout
    ), (r.stdout, r.stderr)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "study",
            "dashboard",
            "--host",
            "0.0.0.0",
            "--port",
            str(_free_port()),
        ],
        cwd=made,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
    finally:
        proc.kill()
        proc.communicate()
    assert "opens the dashboard to the network" in line
