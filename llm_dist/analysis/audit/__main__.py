"""`python -m llm_dist.analysis.audit …` — the same as `llm-dist audit …`."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
