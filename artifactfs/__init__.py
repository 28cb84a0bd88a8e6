"""artifactfs: Neptune's artifact tracking with no server, and a read-only mount of it all.

A Neptune user changes only the import:

    import artifactfs
    run = artifactfs.init_run(project="ml-team/classification")
    run["data_versions"].track_files("datasets/")
"""

from artifactfs.api import FieldHandle, Run, init_run
from artifactfs.entries import ArtifactFileData, artifact_hash
from artifactfs.errors import ArtifactfsError, CheckFailedError, NotFoundError

__version__ = "0.1.0"

__all__ = [
    "ArtifactFileData",
    "ArtifactfsError",
    "CheckFailedError",
    "FieldHandle",
    "NotFoundError",
    "Run",
    "__version__",
    "artifact_hash",
    "init_run",
]
