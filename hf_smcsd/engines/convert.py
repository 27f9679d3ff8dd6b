"""HF Llama checkpoint -> TensorRT-LLM checkpoint, one shard per tensor-parallel rank.

    python -m hf_smcsd.engines.convert --model_dir HF --output_dir CKPT --dtype bfloat16 --tp_size 2

The same conversion as TensorRT-LLM's `examples/models/core/llama/convert_checkpoint.py`
(its `convert_and_save_hf` without quantization), through the installed package, so a build
needs no checkout of the TensorRT-LLM examples. Runs only where tensorrt_llm imports (GPU).

TensorRT-LLM APIs called (read in NVIDIA/TensorRT-LLM, `examples/models/core/llama/convert_checkpoint.py`
at commit 368f8f2a, a 1.2-line version that already emits the engine-flow deprecation):
- `tensorrt_llm.mapping.Mapping(world_size=, rank=, tp_size=, pp_size=)`
- `tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face(model_dir, dtype, mapping=, quant_config=)`
- `tensorrt_llm.models.modeling_utils.QuantConfig()` (no quantization)
- `<model>.save_checkpoint(output_dir, save_config=(rank == 0))` (`models/modeling_utils.py`); it
  does not create `output_dir`, so `main` does
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_smcsd.engines.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tp_size", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        from tensorrt_llm.mapping import Mapping
        from tensorrt_llm.models import LLaMAForCausalLM
        from tensorrt_llm.models.modeling_utils import QuantConfig
    except ImportError as error:  # pragma: no cover - needs the GPU environment
        raise SystemExit(
            f"tensorrt_llm does not import here ({error}); convert on the GPU machine with TensorRT-LLM 1.2."
        ) from error

    # save_checkpoint writes config.json and rank<r>.safetensors into the directory but does
    # not create it (models/modeling_utils.py, PretrainedModel.save_checkpoint, 1.2).
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    for rank in range(args.tp_size):
        start = time.time()
        mapping = Mapping(world_size=args.tp_size, rank=rank, tp_size=args.tp_size, pp_size=1)
        model = LLaMAForCausalLM.from_hugging_face(args.model_dir, args.dtype, mapping=mapping,
                                                   quant_config=QuantConfig())
        model.save_checkpoint(args.output_dir, save_config=(rank == 0))
        del model
        print(f"rank {rank}/{args.tp_size}: converted in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
