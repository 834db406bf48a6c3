"""graphsurgeon: verified rewrite passes, compression and autotuning for ONNX models."""

from graphsurgeon.errors import GraphSurgeonError
from graphsurgeon.model_io import load, save
from graphsurgeon.pipeline import PipelineResult, compile_pipeline, run_pipeline

__version__ = "0.1.0"

__all__ = [
    "GraphSurgeonError",
    "PipelineResult",
    "__version__",
    "compile_pipeline",
    "load",
    "run_pipeline",
    "save",
]
