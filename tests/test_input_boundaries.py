"""Hostile input at the platform's boundaries, and what local users can read (issue #10).

Model names and versions become paths (lock files, state files, sample and repository folders),
so they are checked once, at every door: the `recsys` command (a real subprocess, exit 2 and a
message naming the value before anything is touched), ``RECSYS_MODEL_NAME``, and the library
functions that build paths from a name. Each hostile case runs next to a victim file outside
the state folder and checks that nothing outside it (and no audit record) was written.

The state folder is private to its owner: created 0700 (an existing one tightened), databases
and query samples tightened, and every process the stack spawns starts with umask 077.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.config import (
    MAX_MODEL_NAME_LENGTH,
    check_model_name,
    load_settings,
    served_model_settings,
)
from recsys.triton.repository import InvalidModelNameError
from tests.triton_testing import free_port

ROOT = Path(__file__).resolve().parent.parent
VICTIM_TEXT = "precious: must never be truncated or overwritten\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every path under ``root``: (mode, mtime_ns, content of files)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        found[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, content)
    return found


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """A state folder that does not exist yet, and victims just outside it: the
    ``victim.lock`` that ``--model ../../x/victim`` used to overwrite from ``<home>/locks``."""
    home = tmp_path / "home"
    victim_dir = tmp_path / "x"
    victim_dir.mkdir()
    (victim_dir / "victim.lock").write_text(VICTIM_TEXT)
    (victim_dir / "victim").mkdir()
    return {"root": tmp_path, "home": home, "victim": victim_dir / "victim.lock"}


def _cli_env(home: Path, **extra: str) -> dict[str, str]:
    """Everything pointed into the sandbox; nothing listens on the service ports, so a value
    that slipped through validation would end in exit 3, not 2."""
    env = dict(os.environ)
    env.update(
        {
            "RECSYS_HOME": str(home),
            "RECSYS_TRITON_REPO": str(home.parent / "repo"),
            "RECSYS_TRITON_GRPC_PORT": str(free_port()),
            "RECSYS_TRITON_METRICS_PORT": str(free_port()),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
            "RECSYS_AIRFLOW_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
        }
    )
    env.pop("RECSYS_QUERY_SAMPLE_DIR", None)
    env.pop("RECSYS_MODEL_NAME", None)
    env.update(extra)
    return env


def _recsys(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recsys.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


LONG_NAME = "m" * (MAX_MODEL_NAME_LENGTH + 1)

HOSTILE_MODEL_ARGS = [
    (["rollback", "--model", "../../x/victim"], "'../../x/victim'"),
    (["rollback", "--model", ".."], "'..'"),
    (["rollback", "--model", "a/b"], "'a/b'"),
    (["rollback", "--model", ""], "''"),
    (["rollback", "--model", "a\nb"], "'a\\nb'"),
    (["rollback", "--model", "/etc/passwd"], "'/etc/passwd'"),
    (["rollback", "--model", LONG_NAME], f"{LONG_NAME[:32]!r}... ({len(LONG_NAME)} characters)"),
    (["rollback", "--model", "ok", "--to", "2", "--model", "../x"], "'../x'"),
    (["rollback", "--complete-pending", "--model", "../../x/victim"], "'../../x/victim'"),
    (["deploy", "--version", "1", "--model", "../../x/victim"], "'../../x/victim'"),
    (["query", "drill", "--model", "../../x/victim"], "'../../x/victim'"),
    (["drift", "--model", "../.."], "'../..'"),
    (["drift", "--model", "../../x"], "'../../x'"),
    (["audit", "--model", "../x"], "'../x'"),
]


@pytest.mark.parametrize(("argv", "named"), HOSTILE_MODEL_ARGS, ids=lambda v: repr(v)[:40])
def test_cli_refuses_hostile_model_names_before_touching_anything(argv, named, sandbox):
    before = _snapshot(sandbox["root"])
    result = _recsys(argv, _cli_env(sandbox["home"]), sandbox["root"])

    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"argument --model: invalid model name {named}" in last
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert _snapshot(sandbox["root"]) == before  # victim intact, nothing created anywhere
    assert not sandbox["home"].exists()  # not even the state folder: no lock, no audit record


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["rollback", "--to", "-5"], "versions are numbered from 1, got -5"),
        (["rollback", "--to=-5"], "versions are numbered from 1, got -5"),
        (["rollback", "--to", "0"], "versions are numbered from 1, got 0"),
        (["rollback", "--to", "1.5"], "expected a whole number, got '1.5'"),
        (["rollback", "--to", "abc"], "expected a whole number, got 'abc'"),
        (["rollback", "--to", "../1"], "expected a whole number, got '../1'"),
        (["deploy", "--version", "-5"], "versions are numbered from 1, got -5"),
        (["deploy", "--version", "1.5"], "expected a whole number, got '1.5'"),
        (["drift", "--version", "0"], "versions are numbered from 1, got 0"),
        (["drift", "--version", "abc"], "expected a whole number, got 'abc'"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_cli_refuses_bad_versions_without_an_audit_record(argv, named, sandbox):
    """``rollback --to -5`` once wrote an audit record; now it stops at the argument."""
    before = _snapshot(sandbox["root"])
    result = _recsys(argv, _cli_env(sandbox["home"]), sandbox["root"])

    assert result.returncode == 2, result.stderr
    assert named in result.stderr.strip().splitlines()[-1]
    assert _snapshot(sandbox["root"]) == before
    assert not (sandbox["home"] / "audit").exists()


def test_cli_refuses_a_hostile_recsys_model_name(sandbox):
    """The environment is a boundary too: every process builds paths from it."""
    env = _cli_env(sandbox["home"], RECSYS_MODEL_NAME="../../x/victim")
    before = _snapshot(sandbox["root"])
    for argv in (["rollback"], ["rollback", "--to", "1"], ["drift"], ["status"]):
        result = _recsys(argv, env, sandbox["root"])
        assert result.returncode == 2, (argv, result.stderr)
        assert result.stderr.strip().splitlines() == [
            f"recsys {argv[0]}: InvalidModelNameError: RECSYS_MODEL_NAME: invalid model name "
            "'../../x/victim': use only letters, digits, '_' and '-'"
        ]
    assert _snapshot(sandbox["root"]) == before


def test_a_valid_name_still_reaches_the_services_and_stays_in_the_state_folder(sandbox):
    """The control case: a plain name passes validation, takes its lock under
    ``<home>/locks`` and fails only because nothing serves (exit 3)."""
    before = _snapshot(sandbox["root"])
    result = _recsys(["rollback", "--model", "victim"], _cli_env(sandbox["home"]), sandbox["root"])

    assert result.returncode == 3, result.stderr
    assert "unavailable" in result.stderr
    assert sandbox["victim"].read_text() == VICTIM_TEXT
    after = _snapshot(sandbox["root"])
    outside = {p: v for p, v in after.items() if not p.startswith("home")}
    assert outside == before
    assert (sandbox["home"] / "locks" / "victim.lock").is_file()


def test_nul_in_a_model_name_is_refused_in_process(monkeypatch, sandbox, capsys):
    """No OS passes NUL through argv or the environment; a caller of ``main`` can."""
    from recsys.cli import main

    monkeypatch.setenv("RECSYS_HOME", str(sandbox["home"]))
    with pytest.raises(SystemExit) as parse_error:
        main(["rollback", "--model", "a\x00b"])
    assert parse_error.value.code == 2
    assert "invalid model name 'a\\x00b'" in capsys.readouterr().err
    assert not sandbox["home"].exists()


# -- the same rule in the library ------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../x/victim", "..", ".", "a/b", "", "a\x00b", "a\nb", "a b", LONG_NAME, None, 7]
)
def test_check_model_name_refuses(name):
    with pytest.raises(InvalidModelNameError) as error:
        check_model_name(name)
    assert isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)


def test_check_model_name_accepts_plain_names():
    for name in ("product_search", "product_search_reranker", "A-1", "m" * MAX_MODEL_NAME_LENGTH):
        assert check_model_name(name) == name


def test_load_settings_validates_recsys_model_name(monkeypatch):
    for bad in ("../x", "a/b", "..", "x" * 200):
        monkeypatch.setenv("RECSYS_MODEL_NAME", bad)
        with pytest.raises(ValueError, match=r"^RECSYS_MODEL_NAME: invalid model name"):
            load_settings()
    monkeypatch.setenv("RECSYS_MODEL_NAME", "")
    assert load_settings().model_name == "product_search"  # empty means unset
    monkeypatch.setenv("RECSYS_MODEL_NAME", "shoes")
    assert load_settings().model_name == "shoes"
    with pytest.raises(InvalidModelNameError):
        served_model_settings(load_settings(), "/../../x")


def _settings(sandbox: dict[str, Path], model: str):
    return dataclasses.replace(
        load_settings(),
        home=sandbox["home"],
        triton_repo=sandbox["root"] / "repo",
        query_sample_dir=sandbox["home"] / "query_samples",
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        model_name=model,
    )


def test_library_callers_cannot_escape_either(sandbox):
    """Settings built by hand skip load_settings: the path-building functions check again."""
    from recsys.locking import model_lock
    from recsys.monitoring.drift import check_query_drift
    from recsys.operations import deploy_registered_version, version_dir
    from recsys.rollback import complete_pending_rollback, rollback

    before = _snapshot(sandbox["root"])
    hostile = _settings(sandbox, "../../x/victim")
    with pytest.raises(InvalidModelNameError), model_lock(sandbox["home"] / "locks", "../victim"):
        pass
    for call in (
        lambda: rollback(hostile, "reason"),
        lambda: complete_pending_rollback(hostile),
        lambda: deploy_registered_version(hostile, 1),
        lambda: version_dir(hostile, 1),
        lambda: check_query_drift(_settings(sandbox, "ok"), "../..", 1, commit=False),
        lambda: check_query_drift(hostile, version=1, commit=False),
    ):
        with pytest.raises(InvalidModelNameError):
            call()
    plain = _settings(sandbox, "ok")
    for version in (0, -5, 1.5, "1", "../1", True):
        with pytest.raises(ValueError, match="version number >= 1"):
            version_dir(plain, version)
        with pytest.raises(ValueError, match="version number >= 1"):
            check_query_drift(plain, version=version, commit=False)
        with pytest.raises(ValueError, match="version number >= 1"):
            rollback(plain, "reason", to_version=version)
    assert _snapshot(sandbox["root"]) == before
    assert not sandbox["home"].exists()


# -- the state folder is private -------------------------------------------------------------


def test_prepare_state_dirs_creates_a_private_state_folder(sandbox):
    from recsys import stack

    settings = _settings(sandbox, "ok")
    said: list[str] = []
    stack.prepare_state_dirs(settings, echo=said.append)
    assert _mode(sandbox["home"]) == 0o700
    assert _mode(settings.query_sample_dir) == 0o700
    assert said == []  # nothing to tighten in a new folder


def test_prepare_state_dirs_tightens_what_older_versions_left_readable(sandbox):
    from recsys import stack

    settings = _settings(sandbox, "ok")
    home = sandbox["home"]
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    files = [
        home / "mlflow" / "mlflow.db",
        home / "mlflow" / "basic_auth.db",
        home / "airflow" / "airflow.db",
        home / "airflow" / "airflow.db-wal",
        home / "query_samples" / "ok" / "1" / "queries-0.jsonl",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("customer data\n")
        path.chmod(0o644)
    samples_version_dir = home / "query_samples" / "ok" / "1"
    samples_version_dir.chmod(0o755)
    outside = sandbox["root"] / "elsewhere.jsonl"  # a link out of the tree is not followed
    outside.write_text("not ours\n")
    outside.chmod(0o644)
    (home / "query_samples" / "link").symlink_to(outside)

    said: list[str] = []
    stack.prepare_state_dirs(settings, echo=said.append)

    assert _mode(home) == 0o700
    assert all(_mode(path) == 0o600 for path in files), {str(p): oct(_mode(p)) for p in files}
    assert _mode(samples_version_dir) == 0o700
    assert _mode(outside) == 0o644
    assert said[0] == f"  state folder {home} was mode 0755; now 0700 (owner only)"
    assert f"  database {home / 'mlflow' / 'mlflow.db'} was mode 0644; now 0600 (owner only)" in (
        said
    )
    assert any(line.startswith("  query samples:") for line in said), said

    said.clear()
    stack.prepare_state_dirs(settings, echo=said.append)
    assert said == []  # already private: nothing to say


def test_a_sample_folder_outside_the_state_folder_is_not_chmodded(sandbox):
    """``RECSYS_QUERY_SAMPLE_DIR`` may point at a shared folder: the launcher does not own it."""
    from recsys import stack

    shared = sandbox["root"] / "shared_samples"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    settings = dataclasses.replace(_settings(sandbox, "ok"), query_sample_dir=shared)
    stack.prepare_state_dirs(settings, echo=lambda _: None)
    assert _mode(shared) == 0o755
    assert _mode(sandbox["home"]) == 0o700


def test_spawned_services_create_private_files(sandbox):
    """The spawn helper every stack service goes through gives its process umask 077, even when
    the launcher's own umask is the usual 022: databases, logs and samples come out 0600/0700."""
    from recsys import stack

    work = sandbox["root"] / "work"
    work.mkdir()
    probe = stack.Service(
        "probe",
        [
            sys.executable,
            "-c",
            "import os, sqlite3; sqlite3.connect('probe.db').execute('create table t (x)'); "
            "os.makedirs('samples/m/1'); open('samples/m/1/q.jsonl', 'w').write('{}')",
        ],
        dict(os.environ),
        None,
    )
    log_path = sandbox["root"] / "logs" / "probe.log"
    previous = os.umask(0o022)
    try:
        process = stack.spawn(probe, log_path, work)
    finally:
        os.umask(previous)
    assert process.wait(timeout=60) == 0, log_path.read_text()
    assert _mode(work / "probe.db") == 0o600
    assert _mode(work / "samples") == 0o700
    assert _mode(work / "samples" / "m" / "1" / "q.jsonl") == 0o600
    assert _mode(log_path) == 0o600


def test_the_airflow_login_hint_names_the_file_not_the_password(sandbox):
    from recsys import stack

    settings = _settings(sandbox, "ok")
    password = stack.airflow_password(settings)
    hint = stack.airflow_login_hint(settings)
    assert password not in hint
    path = Path(hint.split("password in ", 1)[1])
    assert path.read_text().strip() == password
    assert _mode(path) == 0o600
    assert hint.startswith(f"user {stack.AIRFLOW_USER}, ")
