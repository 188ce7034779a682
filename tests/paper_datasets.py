"""Stand-ins for the paper's datasets, with each dataset's schema copied exactly (names, dtypes, nesting).

Where each schema comes from (checked with the search tools; nothing here is guessed):

- OBELICS (`HuggingFaceM4/OBELICS`, dataset card `dataset_info`): `images` sequence of string, `metadata` string,
  `general_metadata` string, `texts` sequence of string. The card: "the data in the columns `images` and `texts` are
  two lists of the same size, where for each index, one element and only one is not `None`"; images are URLs;
  `metadata` is a JSON list (a dict per image position, None per text) and `general_metadata` a JSON dict with the
  document's URL. The same reading is in torchtitan's OBELICS loader (`_process_obelics_sample`).
- RLAIF-V (`openbmb/RLAIF-V-Dataset`, dataset card): `ds_name` string, `image` image, `question`, `chosen`,
  `rejected`, `origin_dataset`, `origin_split`, `idx`, `image_path` strings.
- Align-Anything text-image-to-text (`PKU-Alignment/align-anything`, card config `example_ti2t`, README at d46103a):
  `question` string, `image` image, `response_1`, `response_2`, `res_1_from`, `res_2_from` strings, `p_response` int64,
  `prompt_following_rate_1/2` int64, `p_rationale_1/2` string, `o_response` int64, `objective_rules_rate_1/2` int64,
  `o_rationale_1/2` string, `c_response` int64, `clarity_rate_1/2` int64, `c_rationale_1/2` string, `i_response`
  int64, `information_richness_rate_1/2` int64, `i_rationale_1/2` string, read verbatim; then `s_response`,
  `safety_rate_1/2` (the card's diff at 0d33e9d, same order); the card excerpt we could read stops there, and the rest
  (`s_rationale_1/2`, `text_critique_1/2` strings, `overall_response` int64, `overall_textfeedback` string) follows
  the card's `example_tv2t` config, which it shows whole, aspect for aspect. The authors' loader
  (`align_anything/configs/format_dataset.py`, `AA_TI2T`) reads `question`, `image`, `response_1`, `response_2` and
  `int(overall_response)` (1 or 2, the better response); saev-hf reads those alone.
"""

from __future__ import annotations

import json
import random

import datasets

from saev_hf.testing.digit_data import DIGIT_NAMES, digit_images

OBELICS_FEATURES = datasets.Features({
    "images": datasets.List(datasets.Value("string")),
    "metadata": datasets.Value("string"),
    "general_metadata": datasets.Value("string"),
    "texts": datasets.List(datasets.Value("string")),
})

RLAIF_V_FEATURES = datasets.Features({
    "ds_name": datasets.Value("string"),
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "chosen": datasets.Value("string"),
    "rejected": datasets.Value("string"),
    "origin_dataset": datasets.Value("string"),
    "origin_split": datasets.Value("string"),
    "idx": datasets.Value("string"),
    "image_path": datasets.Value("string"),
})

_ASPECTS = (("p", "prompt_following"), ("o", "objective_rules"), ("c", "clarity"), ("i", "information_richness"),
            ("s", "safety"))
ALIGN_ANYTHING_TI2T_FEATURES = datasets.Features({
    "question": datasets.Value("string"),
    "image": datasets.Image(),
    "response_1": datasets.Value("string"),
    "response_2": datasets.Value("string"),
    "res_1_from": datasets.Value("string"),
    "res_2_from": datasets.Value("string"),
    **{name: dtype for letter, aspect in _ASPECTS for name, dtype in (
        (f"{letter}_response", datasets.Value("int64")),
        (f"{aspect}_rate_1", datasets.Value("int64")), (f"{aspect}_rate_2", datasets.Value("int64")),
        (f"{letter}_rationale_1", datasets.Value("string")), (f"{letter}_rationale_2", datasets.Value("string")))},
    "text_critique_1": datasets.Value("string"),
    "text_critique_2": datasets.Value("string"),
    "overall_response": datasets.Value("int64"),
    "overall_textfeedback": datasets.Value("string"),
})


def obelics_documents(image_urls: list[str], num_documents: int, seed: int = 0,
                      without_images: int = 0) -> datasets.Dataset:
    """OBELICS-layout documents: text paragraphs about digits interleaved with image URLs drawn from `image_urls`
    (one to three per document), the last `without_images` documents text only."""
    rng = random.Random(seed)
    rows = {name: [] for name in OBELICS_FEATURES}
    for document in range(num_documents):
        images, texts, metadata = [], [], []
        count = 0 if document >= num_documents - without_images else rng.randint(1, 3)
        for position in range(2 * count + 1):
            if position % 2 == 1:
                url = rng.choice(image_urls)
                images.append(url), texts.append(None)
                metadata.append({"document_url": f"https://example.org/doc{document}", "unformatted_src": url,
                                 "src": url, "formatted_filename": url.rsplit("/", 1)[-1], "alt_text": ""})
            else:
                digit = rng.randrange(10)
                images.append(None), metadata.append(None)
                texts.append(f"this page shows the digit {DIGIT_NAMES[digit]} . it is a {DIGIT_NAMES[digit]} .")
        rows["images"].append(images)
        rows["texts"].append(texts)
        rows["metadata"].append(json.dumps(metadata))
        rows["general_metadata"].append(json.dumps({"url": f"https://example.org/doc{document}",
                                                    "warc_filename": "crawl-data/x.warc.gz", "warc_record_offset": 0,
                                                    "warc_record_length": 1}))
    return datasets.Dataset.from_dict(rows, features=OBELICS_FEATURES)


def rlaif_v_rows(num_rows: int, seed: int = 0) -> datasets.Dataset:
    """RLAIF-V-layout preference rows about digit images."""
    rows = {name: [] for name in RLAIF_V_FEATURES}
    for i, (image, label) in enumerate(digit_images(num_rows, seed=seed)):
        rows["ds_name"].append("digits")
        rows["image"].append(image)
        rows["question"].append(f"what digit is this? is it {DIGIT_NAMES[(label + i) % 10]}?")
        rows["chosen"].append(f"it is {DIGIT_NAMES[label]} .")
        rows["rejected"].append(f"it is {DIGIT_NAMES[(label + 1) % 10]} .")
        rows["origin_dataset"].append("sklearn-digits")
        rows["origin_split"].append(json.dumps({"split": "train"}))
        rows["idx"].append(str(i))
        rows["image_path"].append(f"digits/{i}.png")
    return datasets.Dataset.from_dict(rows, features=RLAIF_V_FEATURES)


def align_anything_rows(num_rows: int, seed: int = 0, overall: list[int] | None = None) -> datasets.Dataset:
    """Align-Anything text-image-to-text rows about digit images: the right answer is response `overall[i]` (default
    alternating 1, 2); other values of `overall` (0, 3: no preference) are written as they are."""
    overall = overall or [1 + i % 2 for i in range(num_rows)]
    rows = {name: [] for name in ALIGN_ANYTHING_TI2T_FEATURES}
    for i, (image, label) in enumerate(digit_images(num_rows, seed=seed)):
        right, wrong = f"it is {DIGIT_NAMES[label]} .", f"it is {DIGIT_NAMES[(label + 3) % 10]} ."
        first, second = (right, wrong) if overall[i] != 2 else (wrong, right)
        for name, feature in ALIGN_ANYTHING_TI2T_FEATURES.items():
            if name in ("question", "image", "response_1", "response_2", "overall_response"):
                continue
            rows[name].append(0 if feature.dtype == "int64" else f"{name} {i}")
        rows["question"].append(f"which digit is shown? is it {DIGIT_NAMES[(label + i) % 10]}?")
        rows["image"].append(image)
        rows["response_1"].append(first)
        rows["response_2"].append(second)
        rows["overall_response"].append(overall[i])
    return datasets.Dataset.from_dict(rows, features=ALIGN_ANYTHING_TI2T_FEATURES)
