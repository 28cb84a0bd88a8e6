#!/usr/bin/env bash
# Sets everything up, then tracks a small demo dataset in the default embedded store and shows
# what artifactfs recorded: the run, its files and hashes, a verified download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

demo=${ARTIFACTFS_DEMO_DIR:-/tmp/artifactfs-demo}
rm -rf "$demo"
mkdir -p "$demo/datasets/train" "$demo/datasets/test"
.venv/bin/python - "$demo/datasets" <<'PY'
import random, sys
from pathlib import Path
root = Path(sys.argv[1])
rng = random.Random(42)
for split, rows in (("train", 200), ("test", 50)):
    lines = ["x,y,label"] + [f"{rng.random():.4f},{rng.random():.4f},{rng.randint(0, 1)}" for _ in range(rows)]
    (root / split / "samples.csv").write_text("\n".join(lines) + "\n")
(root / "README.txt").write_text("demo dataset for artifactfs\n")
PY

echo "\$ artifactfs --project demo/classification track data_versions $demo/datasets"
run_id=$(artifactfs --project demo/classification track data_versions "$demo/datasets" | tail -n 1)
echo "$run_id"
echo
echo "\$ artifactfs --project demo/classification runs" && artifactfs --project demo/classification runs
echo
echo "\$ artifactfs files $run_id data_versions" && artifactfs files "$run_id" data_versions
echo
echo "\$ artifactfs hash $run_id data_versions" && artifactfs hash "$run_id" data_versions
echo
echo "\$ artifactfs verify $run_id" && artifactfs verify "$run_id"
echo
echo "\$ artifactfs download $run_id data_versions $demo/downloaded"
artifactfs download "$run_id" data_versions "$demo/downloaded"
ls -lR "$demo/downloaded"
