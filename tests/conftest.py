"""Shared test set-up: everything offline, and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A Hugging Face cache of the suite's own (set before anything imports huggingface_hub, which
# reads it once): what this machine's ~/.cache holds can neither help nor hurt a test.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="genrecal-tests-hf-")
os.environ.pop("HF_DATASETS_CACHE", None)

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite split over processes (pytest -n): one thread each,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and for the CLIs they start (2 cores, 2 workers)


HEAVY = ("torch", "transformers", "datasets", "accelerate")


def heavy_imports(argv: list[str]) -> list[str]:
    """Run `genrecal ARGV` in a fresh interpreter; the heavy libraries it imported (it must exit 0)."""
    code = (
        "import sys\nfrom genrecal_cli.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"print('HEAVY=' + ','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300, input: str | None = None):
    """Run `python -m genrecal_cli ARGS` as a user would (`input` piped to stdin); returns the CompletedProcess."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "genrecal_cli", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Built-in tiny models are built once per test session into a private cache."""
    os.environ["GENRECAL_CACHE"] = str(tmp_path_factory.mktemp("genrecal-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_pair(_private_cache):
    """The default teacher (Qwen2-VL, BPE) and student (LLaVA, SentencePiece-style) as VLM views."""
    from genrecal_cli.models import load_vlm
    from genrecal_cli.world.zoo import resolve_source

    return load_vlm(resolve_source("zoo:tiny-teacher")), load_vlm(resolve_source("zoo:tiny-student"))
