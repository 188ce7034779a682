"""`saev demo` and the miniatures behind it, off the path a real model takes.

- `digits`: the first miniature (a tiny LLaVA captioning single handwritten digits).
"""

from .digits import (  # noqa: F401
    CORRUPTIONS,
    SCORE_COLUMNS,
    DemoArguments,
    DemoDigits,
    dpo_digit_accuracy,
    preference_rows,
    pretrain_mllm,
    run_demo,
    split_digits,
    train_scoring_saev,
)
