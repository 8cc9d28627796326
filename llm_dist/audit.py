"""`python -m llm_dist.audit …` — the same as `llm-dist audit …` (see llm_dist/analysis/audit)."""
import sys

from llm_dist.analysis.audit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
