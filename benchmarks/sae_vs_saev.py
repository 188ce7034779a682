"""Benchmark: the paper's SAE vs SAE-V comparison, in miniature, on a tiny MLLM trained on handwritten digits.

The SAE-V paper (ICML 2025, section on reconstruction) trains two sparse autoencoders of the same architecture on the
same MLLM layer: an "SAE" on text-only data (the Pile) and an "SAE-V" on interleaved image-text data (OBELICS), and
finds that the SAE-V reconstructs the MLLM's activations better. This script repeats that comparison on a model small
enough for a CPU:

1. Models. A tiny text-only Llama (`build_tiny_model("text")`) is trained on text-only conversations about digits
   (`digit_text_examples`: name the figure "7", give the figure of "seven", even/odd, larger than five). A tiny LLaVA
   (`build_tiny_model("llava")`) gets that text model's weights as its language model (`load_text_model_weights`, as a
   real LLaVA starts from its LLM) and is then trained, vision encoder frozen, on image captioning of 1000 real
   scikit-learn digits (`digit_caption_examples`: "what digit is this ?" -> "a handwritten digit seven .") mixed with
   1000 of those text conversations (`pretrain_tiny_model`). Its held-out digit accuracy is reported.
2. SAEs, both reading the LLaVA's decoder layer `--layer` (residual stream), with the same hyper-parameters and the
   same number of training tokens (`--steps` x `--batch-tokens`), trained by `train_saev`:
   - SAE: the LLaVA's activations on text-only conversations (no image), the paper's text-only baseline in miniature
     (the paper runs the Pile through the MLLM in the same way: both SAEs read the same MLLM layer);
   - SAE-V: the LLaVA's activations on image + question + caption conversations of other digits.
3. Evaluation on held-out data: (a) multimodal: image + question + caption of unseen digits, all tokens and split
   into image and text tokens; (b) text-only conversations run through the LLaVA; (c) transfer: the same text-only
   conversations run through the tiny text LM the LLaVA was initialised from. Metrics: L0, MSE, explained variance and
   dead features (`evaluate_saev`); the models' next-token loss on the answer tokens with layer L's output replaced
   by the reconstruction, as "answer CE recovered" = (CE_zero - CE_sae) / (CE_zero - CE_clean), and the LLaVA's
   held-out digit accuracy with the SAE spliced in (`evaluate_saev`'s CE over every position is reported too, but
   these models never learned to predict question or image-placeholder tokens, so it says little).
4. Seeds: the two models are trained once (seed 0) and shared; each of `--seeds` sets the SAEs' initialisation and
   data order (for SAE and SAE-V alike). Results are mean +- sample standard deviation over the seeds.

Writes `sae_vs_saev.md` (tables and conclusion), `sae_vs_saev.json` (every number) and `sae_vs_saev.png` (bar plot)
to `--output-dir`. One thread, every seed set: the defaults regenerate the committed files on the same software stack
(results across machines can differ in the last digits). About 3 minutes on a 2-core CPU.

    python benchmarks/sae_vs_saev.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from saev_hf import PromptFormat, SAEVTrainingArguments, evaluate_saev, train_saev  # noqa: E402
from saev_hf.activations import find_decoder_layers  # noqa: E402
from saev_hf.testing.tiny_models import build_tiny_model  # noqa: E402
from saev_hf.testing.digit_data import digit_caption_examples, digit_images, digit_text_examples  # noqa: E402
from saev_hf.testing.tiny_pretraining import answer_loss, digit_accuracy, load_text_model_weights, pretrain_tiny_model

KINDS = ("sae", "saev")
KIND_NAMES = {"sae": "SAE", "saev": "SAE-V"}
KIND_LABELS = {"sae": "SAE (text-only inputs)", "saev": "SAE-V (image-text inputs)"}
# evaluation sets and the token splits reported for each
EVAL_SETS = {"multimodal": ("image + question + caption, LLaVA", ("all", "image", "text")),
             "text_only": ("text-only conversations, LLaVA", ("all",)),
             "transfer": ("text-only conversations, the text LM", ("all",))}

# Data: digit_images(1797, seed=0) in this order: [0, 1000) teach the LLaVA, [1000, 1500) train the SAE-V,
# the rest is held out for evaluation.
MLLM_DIGITS, SAE_DIGITS = slice(0, 1000), slice(1000, 1500)
EVAL_DIGITS_START = 1500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SAE seeds (init and data order).")
    parser.add_argument("--layer", type=int, default=2, help="Decoder layer read (of the tiny models' 4).")
    parser.add_argument("--expansion-factor", type=int, default=8, help="d_sae / d_in (d_in = 64).")
    parser.add_argument("--l1-coefficient", type=float, default=3.0, help="L1 coefficient (both SAEs).")
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="Adam learning rate (both SAEs).")
    parser.add_argument("--steps", type=int, default=600, help="SAE training steps (both SAEs).")
    parser.add_argument("--batch-tokens", type=int, default=512, help="Tokens per SAE training step.")
    parser.add_argument("--eval-examples", type=int, default=256, help="Held-out rows per evaluation set.")
    parser.add_argument("--text-model-steps", type=int, default=300, help="Training steps of the tiny text LM.")
    parser.add_argument("--mllm-steps", type=int, default=1000, help="Training steps of the tiny LLaVA.")
    parser.add_argument("--mllm-learning-rate", type=float, default=1e-3, help="Learning rate of the tiny LLaVA.")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"),
                        help="Where sae_vs_saev.{md,json,png} are written.")
    return parser.parse_args(argv)


def log(message: str) -> None:
    """Print `message` with the time, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------------
def build_data(eval_examples: int) -> dict:
    """The digits and every set of rows: the models' training rows, the SAEs' training data, the held-out rows."""
    from datasets import Dataset

    digits = digit_images(1797, seed=0)
    eval_digits = digits[EVAL_DIGITS_START : EVAL_DIGITS_START + eval_examples]
    return {
        "digits": digits,
        "text_model_rows": digit_text_examples(2000, seed=1),
        "mllm_rows": digit_caption_examples(digits[MLLM_DIGITS], seed=1) + digit_text_examples(1000, seed=2),
        "sae_train": {
            "sae": Dataset.from_list(digit_text_examples(2000, seed=3)),
            "saev": Dataset.from_list(digit_caption_examples(digits[SAE_DIGITS], seed=3)),
        },
        "eval_digits": eval_digits,
        "eval_multimodal": digit_caption_examples(eval_digits, seed=4),
        "eval_text": digit_text_examples(eval_examples, seed=5),
    }


def train_models(data: dict, args: argparse.Namespace) -> tuple:
    """Train the tiny text LM, then the tiny LLaVA from it; return both, their tokenizer, processor and summaries."""
    text_model, tokenizer = build_tiny_model("text", seed=0)
    log(f"Training the tiny text LM ({args.text_model_steps} steps on {len(data['text_model_rows'])} text rows)")
    text_summary = pretrain_tiny_model(text_model, tokenizer, data["text_model_rows"], steps=args.text_model_steps,
                                       seed=0, eval_examples=data["eval_text"],
                                       eval_digits=[(None, d) for d in range(10)])
    log(f"  answer loss {text_summary['initial_loss']:.3f} -> {text_summary['final_loss']:.3f}")

    llava, processor = build_tiny_model("llava", seed=0)
    load_text_model_weights(llava, text_model)
    log(f"Training the tiny LLaVA from the text LM ({args.mllm_steps} steps on {len(data['mllm_rows'])} rows: "
        f"digit captions and text conversations)")
    llava_summary = pretrain_tiny_model(llava, processor, data["mllm_rows"], steps=args.mllm_steps, seed=0,
                                        learning_rate=args.mllm_learning_rate,
                                        eval_examples=data["eval_multimodal"], eval_digits=data["eval_digits"])
    llava_summary["text_digit_accuracy_after"] = digit_accuracy(llava, processor, [(None, d) for d in range(10)])
    log(f"  caption loss {llava_summary['initial_loss']:.3f} -> {llava_summary['final_loss']:.3f}; held-out digit "
        f"accuracy {llava_summary['digit_accuracy_before']:.1%} -> {llava_summary['digit_accuracy_after']:.1%}")
    for summary in (text_summary, llava_summary):
        summary.pop("seconds")  # wall-clock time is not reproducible: keep it out of the committed files
    return text_model, tokenizer, llava, processor, {"text_model": text_summary, "llava": llava_summary}


# ---------------------------------------------------------------------------------------------------------------------
# SAEs
# ---------------------------------------------------------------------------------------------------------------------
def training_arguments(kind: str, seed: int, args: argparse.Namespace, output_dir: str) -> SAEVTrainingArguments:
    """The same recipe for both SAEs; only the data differ (and so the image column)."""
    return SAEVTrainingArguments(
        layer=args.layer,
        output_dir=output_dir,
        expansion_factor=args.expansion_factor,
        l1_coefficient=args.l1_coefficient,
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        train_batch_size_tokens=args.batch_tokens,
        buffer_size_tokens=16 * args.batch_tokens,
        input_scale_estimation_tokens=8192,
        read_batch_size=16,
        dead_feature_window=args.steps // 4,
        seed=seed,
        logging_steps=max(1, args.steps // 4),
        disable_tqdm=True,
        report_to="none",
    )


@contextmanager
def spliced(model, layer: int, replace):
    """Replace the output of decoder layer `layer` of `model` by `replace(hidden_states)` at every position."""
    layers = find_decoder_layers(model)

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        new = replace(hidden).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def reconstruct(sae):
    """A function mapping hidden states to `sae`'s reconstruction of them (for `spliced`)."""
    return lambda hidden: sae.decode(sae.encode(hidden))


def baselines(models: dict, data: dict, layer: int) -> dict:
    """The models' answer loss and digit accuracy as they are and with layer L zero-ablated (no SAE involved)."""
    out = {}
    zero = torch.zeros_like
    for eval_set, (model, processor, rows) in eval_models(models, data).items():
        out[eval_set] = {"answer_ce_clean": answer_loss(model, processor, rows)}
        with spliced(model, layer, zero):
            out[eval_set]["answer_ce_zero"] = answer_loss(model, processor, rows)
    llava, processor = models["llava"], models["processor"]
    out["multimodal"]["digit_accuracy_clean"] = digit_accuracy(llava, processor, data["eval_digits"])
    with spliced(llava, layer, zero):
        out["multimodal"]["digit_accuracy_zero"] = digit_accuracy(llava, processor, data["eval_digits"])
    return out


def eval_models(models: dict, data: dict) -> dict:
    """Evaluation set -> (model, processor, rows)."""
    return {
        "multimodal": (models["llava"], models["processor"], data["eval_multimodal"]),
        "text_only": (models["llava"], models["processor"], data["eval_text"]),
        "transfer": (models["text_model"], models["tokenizer"], data["eval_text"]),
    }


def evaluate(sae, models: dict, data: dict, base: dict, layer: int) -> dict:
    """Reconstruction metrics (`evaluate_saev`) and the models' answer loss / digit accuracy with the SAE spliced in."""
    with_response = PromptFormat(response_column="response")
    text_only = PromptFormat(image_column=None, response_column="response")
    result = {}
    for eval_set, (model, processor, rows) in eval_models(models, data).items():
        metrics = evaluate_saev(sae, model, processor, rows, prompt_format=with_response if eval_set == "multimodal"
                                else text_only, batch_size=16)
        with spliced(model, layer, reconstruct(sae)):
            ce = answer_loss(model, processor, rows)
            if eval_set == "multimodal":
                metrics["answer"] = {"digit_accuracy": digit_accuracy(model, processor, data["eval_digits"])}
        clean, zero = base[eval_set]["answer_ce_clean"], base[eval_set]["answer_ce_zero"]
        metrics.setdefault("answer", {}).update({"answer_ce": ce, "answer_ce_recovered": (zero - ce) / (zero - clean)})
        result[eval_set] = metrics
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and reports
# ---------------------------------------------------------------------------------------------------------------------
RECONSTRUCTION = ("l0", "mse", "explained_variance")
CE_ALL = ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered")
ANSWER = ("answer_ce", "answer_ce_recovered", "digit_accuracy")
LABELS = {"l0": "L0", "mse": "MSE", "explained_variance": "explained variance",
          "ce_loss_recovered": "CE loss recovered (all positions)", "answer_ce": "answer CE",
          "answer_ce_recovered": "answer CE recovered", "digit_accuracy": "digit accuracy"}
HIGHER_IS_BETTER = {"l0": None, "mse": False, "explained_variance": True, "ce_loss_recovered": True,
                    "answer_ce": False, "answer_ce_recovered": True, "digit_accuracy": True}


def mean_std(values: list[float]) -> dict:
    """The mean, the sample standard deviation (0 for one value) and the values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(runs: dict) -> dict:
    """Over seeds: summary[kind][eval_set][split][metric] = {"mean", "std", "values"}; split "answer" holds the
    metrics of the model with the SAE spliced in; summary[kind][eval_set]["dead_features"] too."""
    summary: dict = {}
    for kind in KINDS:
        summary[kind] = {}
        for eval_set, (_, splits) in EVAL_SETS.items():
            first = runs[kind][0]["metrics"][eval_set]
            entry: dict = {}
            for split in (*splits, "answer"):
                metrics = [m for m in (*RECONSTRUCTION, *CE_ALL, *ANSWER) if m in first[split]]
                entry[split] = {m: mean_std([run["metrics"][eval_set][split][m] for run in runs[kind]])
                                for m in metrics}
            entry["dead_features"] = mean_std([run["metrics"][eval_set]["dead_features"] for run in runs[kind]])
            summary[kind][eval_set] = entry
    return summary


def comparison(summary: dict, eval_set: str, split: str, metric: str) -> dict:
    """SAE-V minus SAE; the gap exceeds the seed spread when |diff| > std(SAE) + std(SAE-V)."""
    a, b = summary["sae"][eval_set][split][metric], summary["saev"][eval_set][split][metric]
    diff = b["mean"] - a["mean"]
    better = HIGHER_IS_BETTER[metric]
    winner = None if better is None or diff == 0 else ("saev" if (diff > 0) == better else "sae")
    return {"diff": diff, "spread": a["std"] + b["std"], "exceeds_spread": abs(diff) > a["std"] + b["std"],
            "better": winner}


def fmt(stat: dict, metric: str) -> str:
    """`stat` as 'mean ± std', in percent or with the decimals that suit `metric`."""
    if metric == "digit_accuracy":
        return f"{stat['mean']:.1%} ± {stat['std']:.1%}"
    digits = 1 if metric == "l0" else 4 if metric == "mse" else 3
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def cell(summary: dict, kind: str, eval_set: str, split: str, metric: str) -> str:
    """A table cell: `kind`'s `metric`, in bold when it beats the other SAE by more than the seed spread."""
    text = fmt(summary[kind][eval_set][split][metric], metric)
    c = comparison(summary, eval_set, split, metric)
    return f"**{text}**" if c["better"] == kind and c["exceeds_spread"] else text


SPLIT_LABELS = {("multimodal", "all"): "multimodal, all tokens", ("multimodal", "image"): "multimodal, image tokens",
                ("multimodal", "text"): "multimodal, text tokens", ("text_only", "all"): "text-only, LLaVA",
                ("transfer", "all"): "text-only, text LM (transfer)"}
SET_LABELS = {"multimodal": "multimodal (image + question + caption), LLaVA", "text_only": "text-only, LLaVA",
              "transfer": "text-only, text LM (transfer)"}


def reconstruction_rows() -> list[tuple[str, str]]:
    """The (evaluation set, token split) pairs that reconstruction is reported for."""
    return [(eval_set, split) for eval_set, (_, splits) in EVAL_SETS.items() for split in splits]


def reconstruction_table(summary: dict) -> str:
    """The markdown table of L0, MSE and explained variance per evaluation split and SAE."""
    lines = ["| evaluation data | | L0 | MSE | explained variance |", "|---|---|---:|---:|---:|"]
    for eval_set, split in reconstruction_rows():
        for kind in KINDS:
            cells = [cell(summary, kind, eval_set, split, m) for m in RECONSTRUCTION]
            lines.append(f"| {SPLIT_LABELS[eval_set, split]} | {KIND_NAMES[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spliced_table(summary: dict, base: dict) -> str:
    """The markdown table of answer CE (clean, zero-ablated, with each SAE spliced in) and answer CE recovered."""
    lines = ["| evaluation data | answer CE: clean | zero-ablated | SAE | SAE-V | answer CE recovered: SAE | SAE-V |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for eval_set in EVAL_SETS:
        b = base[eval_set]
        lines.append(
            f"| {SET_LABELS[eval_set]} | {b['answer_ce_clean']:.3f} | {b['answer_ce_zero']:.3f} | "
            + " | ".join(cell(summary, kind, eval_set, "answer", "answer_ce") for kind in KINDS) + " | "
            + " | ".join(cell(summary, kind, eval_set, "answer", "answer_ce_recovered") for kind in KINDS) + " |"
        )
    return "\n".join(lines)


def accuracy_table(summary: dict, base: dict) -> str:
    """The markdown table of held-out digit accuracy: clean, zero-ablated and with each SAE spliced in."""
    b = base["multimodal"]
    return "\n".join([
        "| held-out digits named correctly | clean | zero-ablated | with SAE | with SAE-V |",
        "|---|---:|---:|---:|---:|",
        f"| LLaVA, layer L replaced | {b['digit_accuracy_clean']:.1%} | {b['digit_accuracy_zero']:.1%} | "
        + " | ".join(cell(summary, kind, "multimodal", "answer", "digit_accuracy") for kind in KINDS) + " |",
    ])


def all_positions_ce_table(summary: dict) -> str:
    """The markdown table of CE loss recovered over every predicted position, per evaluation split."""
    lines = ["| evaluation data | CE clean | CE zero-ablated | CE recovered: SAE | SAE-V |",
             "|---|---:|---:|---:|---:|"]
    for eval_set, split in reconstruction_rows():
        stats = summary["sae"][eval_set][split]
        lines.append(f"| {SPLIT_LABELS[eval_set, split]} | {stats['ce_clean']['mean']:.3f} | "
                     f"{stats['ce_zero']['mean']:.3f} | "
                     + " | ".join(cell(summary, kind, eval_set, split, "ce_loss_recovered") for kind in KINDS) + " |")
    return "\n".join(lines)


def verdict(summary: dict, eval_set: str, split: str, metric: str) -> str:
    """Which SAE is better on `metric` for this split, by how much, and whether by more than the seed spread."""
    c = comparison(summary, eval_set, split, metric)
    sae, saev = (summary[k][eval_set][split][metric]["mean"] for k in KINDS)
    if c["better"] is None:
        return f"{LABELS[metric]} equal"
    margin = "more than" if c["exceeds_spread"] else "within"
    return (f"{LABELS[metric]} {sae:.3g} (SAE) vs {saev:.3g} (SAE-V): {KIND_NAMES[c['better']]} better by "
            f"{abs(c['diff']):.2g}, {margin} the seed spread ({c['spread']:.2g})")


def headline(summary: dict) -> str:
    """The report's verdict: whether the SAE-V reconstructs the multimodal activations better than the SAE."""
    ev = comparison(summary, "multimodal", "all", "explained_variance")
    ce = comparison(summary, "multimodal", "answer", "answer_ce_recovered")
    ev_means = [summary[k]["multimodal"]["all"]["explained_variance"]["mean"] for k in KINDS]
    ce_means = [summary[k]["multimodal"]["answer"]["answer_ce_recovered"]["mean"] for k in KINDS]
    numbers = (f"explained variance {ev_means[1]:.3f} vs {ev_means[0]:.3f}, answer CE recovered {ce_means[1]:.3f} vs "
               f"{ce_means[0]:.3f} (SAE-V vs SAE)")
    if all(c["better"] == "saev" and c["exceeds_spread"] for c in (ev, ce)):
        return (f"**Yes: as the paper found, the SAE-V reconstructs the MLLM's multimodal activations better than the "
                f"SAE trained on text only**: {numbers}, both differences larger than the spread over seeds.")
    if all(c["better"] == "saev" for c in (ev, ce)):
        return (f"**Partly**: the SAE-V reconstructs the multimodal activations better on average ({numbers}), but "
                f"not by more than the spread over seeds on both metrics.")
    return (f"**No: this miniature does not reproduce the paper's finding** that the SAE-V reconstructs multimodal "
            f"activations better: {numbers}.")


def findings(summary: dict) -> list[str]:
    """One line per evaluation set, computed from the numbers."""
    out = []
    for eval_set, split in reconstruction_rows():
        parts = [verdict(summary, eval_set, split, "explained_variance")]
        if split == "all":
            parts.append(verdict(summary, eval_set, "answer", "answer_ce_recovered"))
        if eval_set == "multimodal" and split == "all":
            parts.append(verdict(summary, eval_set, "answer", "digit_accuracy"))
        l0 = [summary[k][eval_set][split]["l0"]["mean"] for k in KINDS]
        out.append(f"- **{SPLIT_LABELS[eval_set, split]}** (L0 {l0[0]:.1f} SAE, {l0[1]:.1f} SAE-V): "
                   + "; ".join(parts) + ".")
    return out


def write_markdown(path: Path, record: dict) -> None:
    """Write the report (set-up, tables, conclusion) to the markdown `path`."""
    summary, settings, models, base = record["summary"], record["settings"], record["models"], record["baselines"]
    llava, text_model = models["llava"], models["text_model"]
    tokens = settings["steps"] * settings["batch_tokens"]
    d_sae = 64 * settings["expansion_factor"]
    dead = {k: [summary[k][e]["dead_features"]["mean"] for e in ("multimodal", "text_only")] for k in KINDS}
    mm_all = summary["sae"]["multimodal"]["all"]
    text = f"""# SAE vs SAE-V on a tiny MLLM trained on handwritten digits

Generated by `python benchmarks/sae_vs_saev.py` (defaults); every number is in `sae_vs_saev.json`, the plot in
`sae_vs_saev.png`. Mean ± sample standard deviation over {len(settings['seeds'])} SAE seeds
({', '.join(map(str, settings['seeds']))}).

{headline(summary)}

## Set-up

- **MLLM**: the tiny LLaVA of `saev_hf.testing.tiny_models` (CLIP vision tower 32 wide, 16 image tokens per 32x32 image;
  Llama decoder with hidden size 64 and 4 layers). Its language model starts as a copy of the text LM below
  (`load_text_model_weights`), then it is trained with `pretrain_tiny_model` ({llava['steps']} steps, vision tower
  frozen, loss on answer tokens) on captions of {MLLM_DIGITS.stop - MLLM_DIGITS.start} scikit-learn digits plus 1000
  text-only conversations. Answer loss on held-out captions {llava['initial_loss']:.2f} -> {llava['final_loss']:.2f}
  nats/token; it names **{llava['digit_accuracy_after']:.1%}** of {settings['eval_examples']} held-out digits (the ten
  captions ranked by likelihood; {llava['digit_accuracy_before']:.1%} before this training, chance 10%).
- **Text LM** (the transfer target): the tiny Llama, same decoder shape, trained first ({text_model['steps']} steps)
  on text-only conversations about digits (answer loss {text_model['initial_loss']:.2f} ->
  {text_model['final_loss']:.2f}).
- **SAE** and **SAE-V**: one architecture and one recipe (`train_saev`), reading the LLaVA's layer {settings['layer']}
  residual stream (d_in 64; layer index {settings['layer']} of 0-3): expansion {settings['expansion_factor']} (d_sae
  {d_sae}), ReLU, L1 coefficient {settings['l1_coefficient']:g}, Adam lr {settings['learning_rate']:g} with the
  paper's warm-up/decay shape, {settings['steps']} steps x {settings['batch_tokens']} tokens = {tokens:,} training
  tokens each, input scale sqrt(d_in)/E||x|| estimated on each SAE's own training data, special tokens included.
  - SAE: the LLaVA's activations on **text-only** conversations (no image). This is the paper's SAE in miniature:
    both SAEs read the same MLLM layer; only the training data differ (the paper: the Pile vs OBELICS).
  - SAE-V: the LLaVA's activations on **image + question + caption** conversations of
    {SAE_DIGITS.stop - SAE_DIGITS.start} other digits.
- **Seeds**: the two models are trained once (seed 0) and shared; the seed sets each SAE's initialisation and data
  order.
- **Evaluation** on held-out data ({settings['eval_examples']} rows per set): multimodal conversations about unseen
  digit images, split into image tokens and text tokens (text = every non-image position, template and special
  tokens included); text-only conversations through the LLaVA; and the same conversations through the text LM
  (transfer: the paper's SAE-V-on-the-base-LLM experiment).

## Results

Bold: better than the other SAE by more than the seed spread (|difference| > sum of the two standard deviations).

Reconstruction of layer {settings['layer']} (`evaluate_saev`):

{reconstruction_table(summary)}

The models with layer {settings['layer']}'s output replaced by the SAE's reconstruction at every position: next-token
cross-entropy on the answer tokens (the captions and answers the models were trained to produce), and answer CE
recovered = (CE_zero - CE_SAE) / (CE_zero - CE_clean):

{spliced_table(summary, base)}

{accuracy_table(summary, base)}

`evaluate_saev`'s CE loss recovered over every predicted position of the split, for completeness only: these models
were trained on answer tokens only, so predicting the question, template and image placeholder tokens is not something
they learned. Over all multimodal positions the clean LLaVA's CE is {mm_all['ce_clean']['mean']:.2f} against
{mm_all['ce_zero']['mean']:.2f} zero-ablated, so the ratio's denominator is {"negative" if mm_all['ce_clean']['mean'] >
mm_all['ce_zero']['mean'] else "small"} and the figure says little (see the other rows too); the answer-token table
above is the one to read:

{all_positions_ce_table(summary)}

Dead features (never firing on the evaluation data, of {d_sae}): SAE {dead['sae'][0]:.1f} on multimodal data,
{dead['sae'][1]:.1f} on text-only data; SAE-V {dead['saev'][0]:.1f} and {dead['saev'][1]:.1f}.

![SAE vs SAE-V](sae_vs_saev.png)

## Conclusion

{headline(summary)}

{chr(10).join(findings(summary))}

{record['discussion']}
"""
    path.write_text(text)


def discussion(summary: dict) -> str:
    """What the numbers show beyond the headline, and the caveats (filled from the numbers)."""
    image = comparison(summary, "multimodal", "image", "explained_variance")
    text_mm = comparison(summary, "multimodal", "text", "explained_variance")
    text_only = comparison(summary, "text_only", "all", "explained_variance")
    transfer = comparison(summary, "transfer", "all", "explained_variance")
    l0 = {k: summary[k]["multimodal"]["image"]["l0"]["mean"] for k in KINDS}
    ev = {e: [summary[k][e]["all"]["explained_variance"]["mean"] for k in KINDS] for e in ("text_only", "transfer")}
    ce = {e: [summary[k][e]["answer"]["answer_ce_recovered"]["mean"] for k in KINDS] for e in ("text_only", "transfer")}

    def who(c: dict) -> str:
        return KIND_NAMES[c["better"]] if c["better"] else "neither"

    lines = [
        f"- The largest gap is on **image tokens**: the {who(image)} explains more of their variance (by "
        f"{abs(image['diff']):.3f}). The text-only SAE never saw an image token in training (L0 on image tokens: "
        f"{l0['sae']:.1f} for the SAE, {l0['saev']:.1f} for the SAE-V).",
        f"- On the **text tokens of multimodal data** (the question and caption after an image, and the template) the "
        f"{who(text_mm)} is better (by {abs(text_mm['diff']):.3f} explained variance).",
        f"- On **text-only data** the {who(text_only)} is better (by {abs(text_only['diff']):.3f} explained variance)"
        + (": each SAE reconstructs best the kind of input it was trained on." if text_only["better"] == "sae"
           and image["better"] == "saev" else "."),
        f"- **Transfer** to the text LM the LLaVA was initialised from: explained variance {ev['transfer'][0]:.3f} "
        f"(SAE) and {ev['transfer'][1]:.3f} (SAE-V), against {ev['text_only'][0]:.3f} and {ev['text_only'][1]:.3f} on "
        f"the same conversations through the LLaVA; answer CE recovered {ce['transfer'][0]:.3f} and "
        f"{ce['transfer'][1]:.3f}. The {who(transfer)} transfers better here"
        + (", as the paper reports SAE-V features transferring to the base LLM." if transfer["better"] == "saev" else
           "; the paper's claim is that SAE-V features transfer to the base LLM, not that they beat an SAE trained "
           "on text there."),
    ]
    return "What the miniature shows:\n\n" + "\n".join(lines) + """

Caveats:

- A miniature: a 64-wide, 4-layer LLaVA, digit captions and a few hundred thousand SAE training tokens, not
  LLaVA-NeXT-7B on OBELICS with 123M tokens. The text-only training data are conversations about the same digits,
  far closer to the multimodal data than the Pile is to OBELICS.
- Three seeds measure the SAEs' training noise only; the MLLM and the text LM are trained once and shared, so the
  spread says nothing about how another pretrained model would come out.
- Both SAEs use the same L1 coefficient (as in the paper), so L0 is an outcome, not a control; a comparison at equal
  L0 would need an L1 sweep per SAE.
- CPU, float32, one thread; another machine or library version may change the last digits."""


def plot(path: Path, summary: dict) -> None:
    """Plot L0, explained variance and answer CE recovered for both SAEs (mean ± std over seeds) to the png `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("L0 (active features per token)", "l0", reconstruction_rows()),
        ("explained variance (higher is better)", "explained_variance", reconstruction_rows()),
        ("answer CE recovered (higher is better)", "answer_ce_recovered",
         [(eval_set, "answer") for eval_set in EVAL_SETS]),
    ]
    colors = {"sae": "#8c8c8c", "saev": "#1f77b4"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [5, 5, 3]})
    width = 0.38
    for ax, (title, metric, rows) in zip(axes, panels):
        for offset, kind in zip((-width / 2, width / 2), KINDS):
            stats = [summary[kind][e][s][metric] for e, s in rows]
            ax.bar([i + offset for i in range(len(rows))], [x["mean"] for x in stats], width,
                   yerr=[x["std"] for x in stats], capsize=3, color=colors[kind], label=KIND_LABELS[kind])
        labels = [SPLIT_LABELS[e, "all" if s == "answer" else s] for e, s in rows]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([label.replace(", ", ",\n", 1) for label in labels], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if metric != "l0":
            ax.set_ylim(min(0.0, *(summary[k][e][s][metric]["mean"] for k in KINDS for e, s in rows)) - 0.05, 1.05)
    axes[0].legend(fontsize=8)
    fig.suptitle("SAE (trained on text-only inputs) vs SAE-V (trained on image-text inputs), same layer of a tiny "
                 "LLaVA trained on digits; mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def round_floats(value, digits: int = 6):
    """Round every float (for a JSON that is readable and stable in its last digits)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v, digits) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    """Train the models and both SAEs per seed, write the md, json and png to args.output_dir; return the record."""
    args = parse_args(argv)
    logging.getLogger("saev_hf").setLevel(logging.ERROR)  # "data exhausted, new pass" warnings are expected here
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    data = build_data(args.eval_examples)
    text_model, tokenizer, llava, processor, model_summaries = train_models(data, args)
    models = {"text_model": text_model, "tokenizer": tokenizer, "llava": llava, "processor": processor}

    base = baselines(models, data, args.layer)
    log(f"Without SAE: held-out digit accuracy {base['multimodal']['digit_accuracy_clean']:.1%} "
        f"({base['multimodal']['digit_accuracy_zero']:.1%} with layer {args.layer} zero-ablated)")
    runs: dict = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for kind in KINDS:
                log(f"Seed {seed}: training the {KIND_LABELS[kind]} ({args.steps} steps x {args.batch_tokens} tokens)")
                columns = PromptFormat(image_column="images" if kind == "saev" else None, response_column="response")
                sae = train_saev(training_arguments(kind, seed, args, f"{work}/{kind}-{seed}"), model=llava,
                                 processor=processor, dataset=data["sae_train"][kind], prompt_format=columns)
                metrics = evaluate(sae, models, data, base, args.layer)
                runs[kind].append({"seed": seed, "metrics": metrics})
                mm, to, tr = metrics["multimodal"], metrics["text_only"], metrics["transfer"]
                log(f"  multimodal: L0 {mm['all']['l0']:.1f}, explained variance {mm['all']['explained_variance']:.3f} "
                    f"(image {mm['image']['explained_variance']:.3f}, text {mm['text']['explained_variance']:.3f}), "
                    f"answer CE recovered {mm['answer']['answer_ce_recovered']:.3f}, digit accuracy "
                    f"{mm['answer']['digit_accuracy']:.1%}; text-only: explained variance "
                    f"{to['all']['explained_variance']:.3f}, answer CE recovered "
                    f"{to['answer']['answer_ce_recovered']:.3f}; transfer: {tr['all']['explained_variance']:.3f}, "
                    f"{tr['answer']['answer_ce_recovered']:.3f}")

    summary = summarise(runs)
    settings = {name: value for name, value in vars(args).items() if name != "output_dir"}
    record = {
        "description": "SAE (trained on text-only inputs) vs SAE-V (trained on image-text inputs) on the same layer of "
                       "a tiny LLaVA trained on scikit-learn digits; see benchmarks/sae_vs_saev.py.",
        "settings": settings,
        "torch": torch.__version__,
        "models": model_summaries,
        "baselines": base,
        "summary": summary,
        "comparisons": {
            f"{eval_set}/{split}/{metric}": comparison(summary, eval_set, split, metric)
            for eval_set in EVAL_SETS for split, stats in summary["sae"][eval_set].items() if split != "dead_features"
            for metric in stats if HIGHER_IS_BETTER.get(metric) is not None
        },
        "runs": runs,
    }
    record = round_floats(record)
    record["discussion"] = discussion(record["summary"])
    (output_dir / "sae_vs_saev.json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(output_dir / "sae_vs_saev.md", record)
    plot(output_dir / "sae_vs_saev.png", record["summary"])
    print()
    print(reconstruction_table(record["summary"]))
    print()
    print(spliced_table(record["summary"], record["baselines"]))
    print()
    print(accuracy_table(record["summary"], record["baselines"]))
    print()
    print(headline(record["summary"]))
    log(f"Wrote {output_dir}/sae_vs_saev.{{md,json,png}} in {time.perf_counter() - started:.0f} s")
    return record


if __name__ == "__main__":
    main()
