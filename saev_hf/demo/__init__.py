"""`saev demo` and the miniatures behind it, off the path a real model takes.

- `scenes`: the grounded task (scenes of coloured handwritten digits, questions that need the image, preference rows
  with known low-quality kinds);
- `grounded_llava`: the tiny LLaVA that grounds its words in the image, and its four-stage recipe;
- `scene_saev`: the demo's SAE-V with its feature weights and calibrated delta;
- `gate`: the measurements to pass before any DPO sweep;
- `preference`: DPO on scene preference rows, and what it does to accuracy and hallucinations;
- `baselines`: the scores SAE-V's filter is compared with (the model's answer log-likelihood, its own image-text
  similarity);
- `pipeline`: `saev demo` itself ([`run_demo`]);
- `digits`: the first miniature (a tiny LLaVA captioning single digits), still used by two benchmarks;
- the tiny offline MLLMs the tests, benchmarks and miniatures build on: `tiny_processing` (tokenizer, processor
  subclasses), `tiny_models` (seven architectures, one builder), `digit_data` (scikit-learn's digits as images and
  conversations), `tiny_pretraining` (answer loss and log-likelihoods, digit accuracy, the training loop).

Nothing in the library imports this package: a test or script that loads a saved tiny Qwen2-VL or Chameleon folder
in a process that built no tiny model calls `tiny_processing.register_tiny_processors()` first.
"""

from .run import EMBEDDED_MODEL, SCORE_COLUMNS, DemoArguments, load_grounded_llava, load_recipe, run_demo  # noqa: F401
