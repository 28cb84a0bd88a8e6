from pathlib import Path

from tests.conftest import make_tree


def test_track_and_read_back_through_cli(cli, tmp_path: Path) -> None:
    data = make_tree(tmp_path / "datasets", {"train/a.csv": b"a,b\n1,2\n", "b.txt": b"x"})
    tracked = cli("--project", "ml-team/classification", "track", "data_versions", str(data))
    assert tracked.returncode == 0, tracked.stderr
    assert tracked.last_line == "CLS-1"
    listed = cli("files", "CLS-1", "data_versions", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"train/a.csv"' in listed.stdout
