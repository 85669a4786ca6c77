"""Shared test fixtures: where the assets are, and small models converted once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


def asset(rel: str) -> Path:
    """A test asset: the copy under tests/data, else the shared assets beside the checkout
    (../shared/assets); skips the test when neither exists."""
    for base in (DATA, REPO.parent / "shared" / "assets"):
        p = base / rel
        if p.exists():
            return p
    pytest.skip(f"test asset {rel} not found")


def isa_paths():
    from llamacpu import _core

    return list(_core.usable_isas())


@pytest.fixture(scope="session")
def stories_models(tmp_path_factory):
    """stories260K converted to every dtype: {dtype: path}."""
    from llamacpu.convert import convert_checkpoint, open_checkpoint

    out = {}
    d = tmp_path_factory.mktemp("models")
    for dtype in ("f32", "f16", "q8_0", "q4_0"):
        with open_checkpoint(asset("stories260K/meta")) as ck:
            path = d / f"stories260K-{dtype}.bin"
            convert_checkpoint(ck, path, dtype, progress=False)
            out[dtype] = path
    return out
