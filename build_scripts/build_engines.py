#!/usr/bin/env python
"""Build TensorRT-LLM engines for an SMC-SD target and draft: the same as `hf-smcsd build-engines`.

    python build_scripts/build_engines.py --target /models/Llama-3.1-8B-Instruct \
        --draft /models/Llama-3.2-1B-Instruct --tp-size 2 --particles 8 --gamma 8 --dry-run

See `python build_scripts/build_engines.py --help` and trt_engines/README.md.
"""

import sys

from hf_smcsd.engines.build import main

if __name__ == "__main__":
    sys.exit(main())
