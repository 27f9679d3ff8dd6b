"""`hf-smcsd <command> ...`: one entry point, each command in its own module.

Commands are imported only when run, so `hf-smcsd build-engines --dry-run` works without
TensorRT-LLM and `hf-smcsd bench` does not import the engine code.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with a `main(argv) -> int`, one-line help)
COMMANDS = {
    "generate": ("hf_smcsd.generate_cli", "one-shot SMC-SD generation: a prompt (streamed) or a file of prompts, --json"),
    "bench": ("hf_smcsd.bench.bench", "speed of the target alone, assisted generation and SMC-SD, side by side"),
    "fidelity": ("hf_smcsd.bench.fidelity", "exact and task fidelity of SMC-SD against the target"),
    "build-engines": ("hf_smcsd.engines.build", "build TensorRT-LLM engines for a target and a draft"),
    "gpu-check": ("hf_smcsd.engines.gpu_check", "first GPU contact: tiny TensorRT-LLM engines checked against eager"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hf-smcsd <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
