"""`saev demo` and the miniature behind it, off the path a real model takes.

- `scenes`: the grounded task (scenes of coloured handwritten digits, questions that need the image, preference rows
  with known low-quality kinds);
- `grounded_llava`: the tiny LLaVA that grounds its words in the image, and its four-stage recipe;
- `scene_saev`: the demo's SAE-V with its feature weights and calibrated delta;
- `gate`: the measurements to pass before any DPO sweep;
- `preference`: DPO on scene preference rows, and what it does to accuracy and hallucinations;
- `run`: `saev demo` itself ([`run_demo`]), and `report`: what it writes;
- `concept_labels`: labels of the miniature's features by the grounded model answering its own questions (the labelling
  benchmark), and `explorer_default`: what `saev explore` shows with no model named.

The scores SAE-V's filter is compared with live in the library (`saev_hf.scoring.baselines`); the tiny offline MLLMs
the tests, benchmarks and miniature build on live in `saev_hf.testing`. Nothing in the library imports this package.
"""

from .run import EMBEDDED_MODEL, SCORE_COLUMNS, DemoArguments, load_grounded_llava, load_recipe, run_demo  # noqa: F401
