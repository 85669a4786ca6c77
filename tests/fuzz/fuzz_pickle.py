"""Fuzz target: the pickle inside a torch.save archive (data.pkl), wrapped in a valid zip
with the storage records of the seed archive, so that mutations reach the restricted
unpickler instead of failing the zip's checksum. Whatever the pickle asks for, only the
allow-list may be called: a canary global outside it must never run."""

import io
import os
import zipfile

from harness import HERE, instrumented, main, scratch_dir

with instrumented():
    from llamacpu.convert import torchzip  # noqa: F401 (instrumented for coverage)

from fuzz_torchzip import read_all

SCRATCH = scratch_dir()


def _records() -> dict:
    """The seed archive's records other than data.pkl, under the name "archive/"."""
    out = {}
    with zipfile.ZipFile(HERE / "corpus" / "torchzip" / "tiny.pth") as z:
        for info in z.infolist():
            rest = info.filename.split("/", 1)[1]
            if rest != "data.pkl":
                out[rest] = z.read(info)
    return out


RECORDS = _records()
CANARY = []


def canary(*args):  # reachable as fuzz_pickle.canary; the unpickler must refuse it
    CANARY.append(args)


def target(data: bytes) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
        for name, blob in RECORDS.items():
            z.writestr(f"archive/{name}", blob)
    path = os.path.join(SCRATCH, "model.pth")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    try:
        read_all(path)
    finally:
        if CANARY:
            raise AssertionError(f"the unpickler called a global outside the allow-list: {CANARY}")


if __name__ == "__main__":
    main("pickle", target)
