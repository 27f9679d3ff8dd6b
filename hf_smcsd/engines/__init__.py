"""TensorRT-LLM engines for SMC-SD: build steps (`build`), checkpoint conversion (`convert`)
and the manifest written beside each engine (`manifest`). Nothing here imports TensorRT-LLM
at import time; the runner that drives the engines is `hf_smcsd.runners.tensorrt`."""

from .manifest import (
    FORMAT,
    MANIFEST_NAME,
    TRTLLM_PIN,
    EngineLimits,
    EngineMismatchError,
    check_manifest,
    check_pair,
    read_manifest,
    require_fits,
    write_manifest,
)

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "TRTLLM_PIN",
    "EngineLimits",
    "EngineMismatchError",
    "check_manifest",
    "check_pair",
    "read_manifest",
    "require_fits",
    "write_manifest",
]
