"""Training dynamics: the per-example ledger written during a classify run (`ledger.py`, a callback the loop
registers when `dynamics.enabled`) and `llm-dist analyze RUN_DIR` (`analyze.py`): data maps, forgetting,
AUM, losses and `suspicion_*` detector columns, scored against planted noise (`analysis/detectors.py`)."""
