"""Neptune 1.x code runs unchanged: `init_run`'s signature, the run's methods, what `fetch`
returns, and how `track_files` takes its arguments."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.api import Run
from artifactfs.errors import ArtifactfsError, NotFoundError
from artifactfs.store import Store
from tests.conftest import make_tree

pytestmark = pytest.mark.store_backends

PROJECT = "ml-team/classification"


def run_ids() -> list[str]:
    return [record.run_id for record in Store().list_runs()]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {"train/a.csv": b"a\n", "b.csv": b"b\n"})


def test_the_one_positional_argument_is_the_run_id(data: Path) -> None:
    first = artifactfs.init_run(project=PROJECT)
    first["data"].track_files(str(data))
    reopened = artifactfs.init_run("CLS-1")  # Neptune 1.x: init_run(with_id=None, *, ...)
    assert reopened.id == "CLS-1"
    assert reopened["data"].fetch_hash() == first["data"].fetch_hash()
    with pytest.raises(ArtifactfsError, match="with_id") as refused:
        artifactfs.init_run(PROJECT)  # Neptune 0.x code: the project was first
    assert "project=" in str(refused.value)
    assert run_ids() == ["CLS-1"]


def test_neptunes_options_are_taken_and_others_are_a_type_error(data: Path) -> None:
    run = artifactfs.init_run(
        project=PROJECT,
        name="baseline",
        description="first try",
        tags=["a", "b"],
        source_files=["*.py"],
        capture_stdout=False,
        capture_stderr=False,
        capture_hardware_metrics=False,
        fail_on_exception=True,
        monitoring_namespace="monitoring",
        flush_period=1.0,
        proxies={},
        capture_traceback=False,
        git_ref=False,
        dependencies="infer",
    )
    assert run.id == "CLS-1"
    with pytest.raises(TypeError, match="projcet"):
        artifactfs.init_run(projcet=PROJECT)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="with_idd"):
        artifactfs.init_run(with_idd="CLS-1")  # type: ignore[call-arg]
    assert run_ids() == ["CLS-1"]  # nothing made by the refused calls
    assert artifactfs.init_run(run="CLS-1").id == "CLS-1"  # Neptune 0.x's name for with_id


def test_stop_wait_and_sync_take_neptunes_arguments() -> None:
    run = artifactfs.init_run(project=PROJECT)
    run.wait(disk_only=True)
    run.sync(wait=False)
    run.stop(seconds=5)
    with pytest.raises(ArtifactfsError, match="stopped"):
        run["data"].track_files("anything")


def test_exists_knows_fields_their_namespaces_and_sys(data: Path) -> None:
    run = artifactfs.init_run(project=PROJECT)
    run["datasets/train"].track_files(str(data))
    assert run.exists("datasets/train")
    assert run.exists("datasets")
    assert run.exists("sys/id")
    assert not run.exists("datasets/tr")
    assert not run.exists("other")
    assert not run.exists("sys/nothing")


def test_fetch_gives_neptunes_types(data: Path) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    run = artifactfs.init_run(project=PROJECT)
    run["data"].track_files(str(data))
    fetched = run["data"].fetch()
    assert fetched == run["data"].fetch_hash()  # still the hash string, as before
    assert fetched.hash == run["data"].fetch_hash()  # type: ignore[union-attr]
    created = run["sys/creation_time"].fetch()
    assert isinstance(created, datetime)
    assert before <= created <= datetime.now(timezone.utc) + timedelta(seconds=1)


def test_paths_may_be_pathlib_paths_and_field_paths_must_be_strings(data: Path) -> None:
    run = artifactfs.init_run(project=PROJECT)
    run["data"].track_files(data, destination=Path("set"))
    assert sorted(f.file_path for f in run["data"].fetch_files_list()) == [
        "set/b.csv",
        "set/train/a.csv",
    ]
    for wrong in (3, None, b"data"):
        with pytest.raises(ArtifactfsError, match="field path is a string"):
            run[wrong]  # type: ignore[index]
    with pytest.raises(ArtifactfsError, match="path must be a string"):
        run["other"].track_files(42)  # type: ignore[arg-type]
    assert Store().get_run(run.id).fields == ("data",)


@pytest.mark.parametrize(
    ("destination", "prefix"),
    [("./a//b/", "a/b/"), (".", ""), ("", ""), ("./", ""), ("x/./y", "x/y/")],
)
def test_destinations_are_taken_as_neptunes_pathlib_made_them(
    data: Path, destination: str, prefix: str
) -> None:
    run = artifactfs.init_run(project=PROJECT)
    run["data"].track_files(str(data), destination=destination)
    paths = sorted(f.file_path for f in run["data"].fetch_files_list())
    assert paths == [f"{prefix}b.csv", f"{prefix}train/a.csv"]


@pytest.mark.parametrize("destination", ["../up", "a/../../b", "/abs"])
def test_destinations_that_escape_are_still_refused(data: Path, destination: str) -> None:
    run = artifactfs.init_run(project=PROJECT)
    with pytest.raises(ArtifactfsError):
        run["data"].track_files(str(data), destination=destination)
    assert Store().get_run(run.id).fields == ()


# -- custom run ids: the processes of one job share a run --------------------------------------

RANK = """
import sys
import artifactfs
run = artifactfs.init_run(project="ml/ddp")  # the id comes from NEPTUNE_CUSTOM_RUN_ID
run[f"data/rank{sys.argv[1]}"].track_files(sys.argv[2])
print(run["sys/id"].fetch())
"""


def test_processes_of_one_job_share_the_run_of_their_custom_id(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEPTUNE_CUSTOM_RUN_ID", "job-7")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(rank), str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(4)
    ]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs
    assert {out.strip() for out, _ in outputs} == {"DPD-1"}
    shared = artifactfs.init_run("DPD-1", mode="read-only")
    assert Store().get_run("DPD-1").fields == tuple(f"data/rank{rank}" for rank in range(4))
    assert shared.exists("data/rank3")
    assert shared.exists("sys/custom_run_id")
    assert shared["sys/custom_run_id"].fetch() == "job-7"
    # The next job (another id) and a run without one get runs of their own.
    monkeypatch.setenv("NEPTUNE_CUSTOM_RUN_ID", "job-8")
    assert artifactfs.init_run(project="ml/ddp").id == "DPD-2"
    assert artifactfs.init_run(project="ml/ddp", custom_run_id="job-7").id == "DPD-1"
    monkeypatch.delenv("NEPTUNE_CUSTOM_RUN_ID")
    plain = artifactfs.init_run(project="ml/ddp")
    assert plain.id == "DPD-3"
    assert artifactfs.init_run("DPD-2", mode="read-only")["sys/custom_run_id"].fetch() == "job-8"
    assert not plain.exists("sys/custom_run_id")
    with pytest.raises(NotFoundError, match="DPD-3 has no sys/custom_run_id"):
        plain["sys/custom_run_id"].fetch()
    # Resuming by id ignores the job's id; naming both is refused.
    monkeypatch.setenv("NEPTUNE_CUSTOM_RUN_ID", "job-9")
    assert artifactfs.init_run("DPD-1").id == "DPD-1"
    with pytest.raises(ArtifactfsError, match="not both"):
        artifactfs.init_run("DPD-1", custom_run_id="job-7")
    assert run_ids() == ["DPD-1", "DPD-2", "DPD-3"]


SPAWN_AFTER_TRACKING = """
import multiprocessing, sys, threading, artifactfs
run = artifactfs.init_run(project="ml/ddp")
run["data"].track_files(sys.argv[1])
run["data"].download(sys.argv[2], progress_bar=True)
print(multiprocessing.get_start_method(allow_none=True))
multiprocessing.set_start_method("spawn")
print("tqdm_monitor" in [thread.name for thread in threading.enumerate()])
"""


def test_a_script_may_choose_its_multiprocessing_start_method_after_tracking(
    data: Path, tmp_path: Path
) -> None:
    """tqdm's default lock made a multiprocessing lock, fixing the start method: a training
    script that tracked its data and then set "spawn" for its workers failed. Nor is tqdm's
    monitor thread left running in it (for good: a multi-threaded process to fork)."""
    script = [sys.executable, "-c", SPAWN_AFTER_TRACKING, str(data), str(tmp_path / "out")]
    done = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["None", "False"], done
    assert (tmp_path / "out" / "train" / "a.csv").read_bytes() == b"a\n"


@pytest.mark.parametrize("custom_id", ["", "x" * 37, "a\x00b"])
def test_an_invalid_custom_run_id_is_one_line_and_makes_nothing(custom_id: str) -> None:
    with pytest.raises(ArtifactfsError, match="custom run id"):
        artifactfs.init_run(project=PROJECT, custom_run_id=custom_id)
    assert run_ids() == []


def test_neptunes_other_metadata_is_refused_in_one_clear_line(data: Path) -> None:
    """`run["lr"] = 0.1`, `.append(...)`, `.upload(...)`: not kept here, and said so (not an
    AttributeError from deep inside), with nothing written."""
    run = artifactfs.init_run(project=PROJECT)
    with pytest.raises(ArtifactfsError, match="artifact fields only"):
        run["parameters"] = {"lr": 0.1}
    for call in (
        lambda: run["train/loss"].append(0.9),  # type: ignore[attr-defined]
        lambda: run["model"].upload("model.pt"),  # type: ignore[attr-defined]
        lambda: run["data"].log(1),  # type: ignore[attr-defined]
    ):
        with pytest.raises(ArtifactfsError, match="artifact fields only"):
            call()
    assert not hasattr(run["data"], "append")
    run["data"].track_files(str(data))  # the artifact API is untouched
    assert Store().get_run(run.id).fields == ("data",)


def test_a_refused_init_run_makes_no_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARTIFACTFS_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    fresh = str(tmp_path / "fresh" / "store.db")
    refused: list[tuple[str, dict[str, Any]]] = [
        ("needs with_id", {"project": PROJECT, "mode": "read-only"}),
        ("no project", {}),
        ("custom run id", {"project": PROJECT, "custom_run_id": "x" * 37}),
        ("custom run id", {"project": PROJECT, "custom_run_id": ""}),
        ("invalid project", {"project": "a/b/c"}),
        ("invalid project key", {"project": PROJECT, "project_key": "lower"}),
        ("invalid run id", {"with_id": "CLS"}),
        ("invalid project", {"with_id": "CLS-1", "project": "a/b/c"}),
    ]
    for words, arguments in refused:
        with pytest.raises(ArtifactfsError, match=words):
            artifactfs.init_run(store=fresh, **arguments)
    monkeypatch.setenv("NEPTUNE_CUSTOM_RUN_ID", "y" * 40)
    with pytest.raises(ArtifactfsError, match="custom run id"):
        artifactfs.init_run(project=PROJECT, store=fresh)
    assert not (tmp_path / "fresh").exists()


def test_a_run_id_that_is_not_one_says_the_first_argument_is_with_id() -> None:
    for old_style in ("classification", PROJECT):  # Neptune 0.x: init_run(project, ...)
        with pytest.raises(ArtifactfsError, match="first argument is with_id") as refused:
            artifactfs.init_run(old_style)
        assert "project='workspace/name'" in str(refused.value)
    assert run_ids() == []


def test_an_unreadable_creation_time_is_one_line() -> None:
    run = artifactfs.init_run(project=PROJECT)
    odd = Run(run.store, dataclasses.replace(run.record, created_at="2024-01-02T03:04:05Z"))
    with pytest.raises(ArtifactfsError, match="unreadable creation time"):
        odd["sys/creation_time"].fetch()
