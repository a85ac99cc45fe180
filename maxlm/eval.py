"""`python -m maxlm.eval --checkpoint=PATH [--batches=N|all] [--output=FILE.json] [key=value ...]`:
held-out loss, perplexity and bits per byte of a checkpoint (see `maxlm.evaluate`)."""

import sys

from maxlm.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
