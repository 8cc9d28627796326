"""Text → text augmentation, seeded per (id, copy, epoch): EDA (`eda.py`) and contextual replacement with a
masked LM (`mlm_contextual.py`). Augmented copy j of example ID carries the id `ID#augj`."""
from .eda import augment_seed, eda, split_words

__all__ = ["augment_seed", "aug_id", "eda", "split_words"]


def aug_id(example_id: str, copy: int) -> str:
    """The stable id of augmented copy `copy` (1-based) of `example_id`."""
    return f"{example_id}#aug{copy}"
