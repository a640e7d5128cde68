"""Tar shards for the tests: webdataset-style members written from bytes."""

import io
import tarfile


def make_tar(path, members) -> None:
    """Write the tar `path` holding `members`, (name, bytes) pairs, in order."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
