"""Scaffolding for the tests, benchmarks, notebooks and the demo, never imported by the library: tiny offline MLLMs of
seven architectures and their processors (`tiny_models`, `tiny_processing`), scikit-learn's real handwritten digits as
images and conversations (`digit_data`), a few steps of pretraining that make a tiny MLLM know them
(`tiny_pretraining`), SAE-Vs whose features tell rows apart (`tiny_saes`), a tiny CLIP (`tiny_models.build_tiny_clip`)
and an image server on 127.0.0.1 with the web's faults (`image_server`).

A test or script that loads a saved tiny Qwen2-VL or Chameleon folder in a process that built no tiny model calls
`tiny_processing.register_tiny_processors()` first.
"""
