"""`init_run`'s `mode` as Neptune code passes it: unchanged code must keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

import artifactfs
from artifactfs.store import Store
from tests.conftest import make_tree


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "datasets", {"train/a.bin": b"a" * 10, "test/b.bin": b"b" * 20})


@pytest.mark.parametrize("mode", [None, "async", "sync", "offline"])
def test_modes_that_record(datasets: Path, mode: str | None) -> None:
    """None is Neptune's own default (code passing `mode=args.mode` gives it); "offline"
    records locally, which is what every run here does."""
    run = artifactfs.init_run(project="ml/modes", mode=mode)
    run["data"].track_files(str(datasets))
    run.stop()
    again = artifactfs.init_run(with_id=run.id, mode="read-only")
    assert sorted(f.file_path for f in again["data"].fetch_files_list()) == [
        "test/b.bin",
        "train/a.bin",
    ]


def test_no_mode_follows_neptune_mode(monkeypatch: pytest.MonkeyPatch, datasets: Path) -> None:
    run = artifactfs.init_run(project="ml/modes")
    run["data"].track_files(str(datasets))
    monkeypatch.setenv("NEPTUNE_MODE", "read-only")
    read_only = artifactfs.init_run(with_id=run.id)
    assert read_only.read_only
    before = Store().counts()
    with pytest.raises(artifactfs.ArtifactfsError):
        read_only["more"].track_files(str(datasets))
    assert Store().counts() == before


def test_a_neptune_mode_without_meaning_here_records_as_async(
    monkeypatch: pytest.MonkeyPatch, datasets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NEPTUNE_MODE=debug exported for Neptune: code that ran before keeps running (and says
    so in the log), rather than failing on a variable set for another tool."""
    monkeypatch.setenv("NEPTUNE_MODE", "debug")
    run = artifactfs.init_run(project="ml/modes")
    run["data"].track_files(str(datasets))
    assert len(run["data"].fetch_files_list()) == 2
    assert "NEPTUNE_MODE=debug" in caplog.text


def test_an_unknown_mode_is_refused_in_one_line_and_records_nothing() -> None:
    before = Store().counts()
    with pytest.raises(artifactfs.ArtifactfsError) as refused:
        artifactfs.init_run(project="ml/modes", mode="debug")
    assert "'debug'" in str(refused.value) and "\n" not in str(refused.value)
    assert Store().counts() == before
