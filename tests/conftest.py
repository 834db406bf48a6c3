"""Shared fixtures: the example models are built once per machine (offline, seconds)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODELS = Path(os.environ.get("GRAPHSURGEON_EXAMPLES", EXAMPLES / "models"))


def _builder():
    spec = importlib.util.spec_from_file_location("gs_examples_build", EXAMPLES / "build.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def digits() -> dict[str, Path]:
    """digits_cnn.onnx plus its train/test splits (built if missing)."""
    return _builder().build_digits(MODELS)


@pytest.fixture(scope="session")
def minilm() -> dict[str, Path]:
    """minilm_l6.onnx plus real tokenized sentences (built if missing)."""
    return _builder().build_minilm(MODELS)
