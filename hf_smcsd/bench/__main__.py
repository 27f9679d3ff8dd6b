"""`python -m hf_smcsd.bench [options]`: the same as `hf-smcsd bench`."""

import sys

from .bench import main

sys.exit(main())
