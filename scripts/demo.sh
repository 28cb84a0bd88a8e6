#!/usr/bin/env bash
# Sets everything up, tracks a small demo dataset in the default embedded store, mounts it
# read-only and shows it: `ls -lR` of the run, `getfattr` of a file, a verified download.
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
mnt=${ARTIFACTFS_DEMO_MOUNT:-/mnt/artifactfs-demo}
mkdir -p "$mnt"
if grep -q " $mnt fuse" /proc/mounts; then artifactfs unmount "$mnt"; fi
echo "\$ artifactfs mount $mnt"
artifactfs mount "$mnt"
echo
echo "\$ ls -lR $mnt/demo/classification/$run_id"
ls -lR "$mnt/demo/classification/$run_id"
echo
echo "\$ getfattr -d -m - $mnt/demo/classification/$run_id/data_versions/train/samples.csv"
getfattr -d -m - "$mnt/demo/classification/$run_id/data_versions/train/samples.csv"
echo
echo "\$ head -3 $mnt/demo/classification/$run_id/data_versions/train/samples.csv"
head -3 "$mnt/demo/classification/$run_id/data_versions/train/samples.csv"
echo
echo "The mount stays up. Every run in the default store is under $mnt."
echo "Unmount it with:  .venv/bin/artifactfs unmount $mnt"
