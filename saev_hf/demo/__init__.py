"""`saev demo` and the miniatures behind it, off the path a real model takes.

- `scenes`: the grounded task (scenes of coloured handwritten digits, questions that need the image, preference rows
  with known low-quality kinds);
- `grounded_llava`: the tiny LLaVA that grounds its words in the image, and its three-stage recipe;
- `scene_saev`: the demo's SAE-V with its feature weights and calibrated delta;
- `gate`: the measurements to pass before any DPO sweep;
- `preference`: DPO on scene preference rows, and what it does to accuracy and hallucinations;
- `pipeline`: `saev demo` itself ([`run_demo`]);
- `digits`: the first miniature (a tiny LLaVA captioning single digits), still used by two benchmarks.
"""

from .pipeline import EMBEDDED_MODEL, SCORE_COLUMNS, DemoArguments, load_grounded_llava, load_recipe, run_demo  # noqa: F401
