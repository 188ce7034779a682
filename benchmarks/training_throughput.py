"""Benchmark: SAE training throughput of saev_hf's `SAEVTrainer` against SAELens's `SAETrainer` (one CPU thread).

For a few SAE shapes, this script times one full training step of

* **saev_hf**: the real `SAEVTrainer.train` loop, fed pre-computed activation batches through its `batches=` argument
  (forward, loss = MSE + L1 weighted by decoder norms with the warmed-up L1 coefficient, `accelerator.backward`,
  `accelerator.clip_grad_norm_` at 1.0, the accelerate-wrapped Adam step, the LambdaLR scheduler step, zero_grad, and
  the loop's per-step bookkeeping: firing-frequency tracker, per-step metrics sums including explained variance,
  progress bar, logging/checkpoint checks);
* **SAELens**: the body of `SAETrainer.fit`'s loop, step for step (`maybe_reset_sparsity`, `step` -> `_train_step`:
  `StandardTrainingSAE.training_forward_pass`, firing/dead-feature tracking, backward, clip_grad_norm_ at 1.0, Adam,
  SequentialLR scheduler, L1 coefficient scheduler; then `_checkpoint_if_needed`, the step counter, `_update_pbar`),
  on a real `SAETrainer` built with a dummy data provider (its `fit` is not called: batches are handed to it);
* **plain PyTorch**: the floor, a minimal loop on the same maths (scale the input, encode, ReLU, decode, MSE + L1
  penalty, backward, clip_grad_norm_ at 1.0, Adam step) with no scheduler and no bookkeeping;

on the same fixed set of synthetic activations, from the same initial weights, with the same optimizer settings.

How the saev_hf step is isolated without touching library code: `SAEVTrainer.train(batches)` pulls exactly one batch
per step with `next()`. The batches come from a generator in this script, so the time from the generator handing
over batch k to the trainer asking for batch k+1 is exactly saev_hf's step k (everything the loop does per step).
Before handing over batch k, the generator runs SAELens's step and the plain step on that same batch, each timed on
its own, in an order alternated every round. The three are therefore interleaved step by step in one process, so a
slow phase of the shared machine hits them alike; each ratio is taken between the steps of one round (step k of each
library, on batch k). The time before the first step (trainer set-up, tracker init) and after the last one (saving the SAE) is
never inside a measured interval.

Before timing, a check (no timing) trains the three side by side for a few steps from the same weights with L1 and
learning-rate warm-up off and asserts that their losses and weights agree: they do the same maths.

Settings: one thread (OMP_NUM_THREADS=1 before torch is imported, `torch.set_num_threads(1)`), garbage collector paused
during the timed rounds, warm-up rounds excluded. Reported per shape: tokens/s of each (batch tokens / median step
time, on this machine) and the ratios saev_hf / SAELens and saev_hf / plain of throughput (median over rounds of the
paired per-round ratio, with its interquartile range). Compare ratios, not absolute numbers, across runs.

Usage (defaults take about 2.5-4 minutes on a shared 2-core CPU, depending on its load):

    python benchmarks/training_throughput.py
    python benchmarks/training_throughput.py --shapes 64x16@4096 --steps 40
    python benchmarks/training_throughput.py --shapes 768x16@4096 --steps 5 --warmup 1   # the paper's batch; slow

A shape is `D_INxEXPANSION@BATCH_TOKENS`. `--profile python` (cProfile of the timed steps) and `--profile ops`
(torch.profiler over two extra steps, aten ops by input shape) show where each library's step time goes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
import _common  # noqa: E402,F401  (one thread, offline, the checkout importable: before torch is imported)
from _common import quartiles  # noqa: E402

import argparse  # noqa: E402
import cProfile  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from saev_hf.training.buffer import input_scale_from_norms  # noqa: E402
from saev_hf.testing.tiny_models import build_tiny_model  # noqa: E402
from saev_hf.training import SAEVTrainer, SAEVTrainingArguments  # noqa: E402
from saev_hf.runtime.devices import choose_device  # noqa: E402

L1_COEFFICIENT = 5.0  # the paper's recipe (SAEVTrainingArguments defaults), mirrored in SAELens and the plain loop
LIBRARIES = ("saev_hf", "SAELens", "plain")


@dataclass(frozen=True)
class Shape:
    """An SAE shape: d_in, expansion factor and tokens per batch; written D_INxEXPANSION@BATCH_TOKENS."""

    d_in: int
    expansion: int
    batch: int

    @property
    def d_sae(self) -> int:
        return self.d_in * self.expansion

    def __str__(self) -> str:
        return f"{self.d_in}x{self.expansion}@{self.batch}"


def parse_shape(text: str) -> Shape:
    """`text` (e.g. 512x8@4096) as a Shape; an argparse error when it is malformed."""
    try:
        dims, batch = text.split("@")
        d_in, expansion = dims.lower().split("x")
        shape = Shape(int(d_in), int(expansion), int(batch))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected D_INxEXPANSION@BATCH_TOKENS, e.g. 512x8@4096") from None
    if min(shape.d_in, shape.expansion, shape.batch) < 1 or shape.d_in % 4:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be positive and d_in a multiple of 4")
    return shape


# ---------------------------------------------------------------------------------------------------------------------
# Data: one fixed set of synthetic activations per shape
# ---------------------------------------------------------------------------------------------------------------------


def synthetic_activations(d_in: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Residual-stream-like activations `(tokens, d_in)`: not isotropic, with heavy-tailed token norms.

    x = m + D g * r_t, with a shared mean vector m (about half a typical token's norm), per-dimension scales D
    (log-normal, one dimension in 256 "massive", 20x larger), g standard Gaussian, and per-token scales r_t log-normal
    (sigma 0.5). The median token norm is about 2 sqrt(d_in) (16 at d_in 64, 48 at 512, 59 at 768, ~128 at 4096: the
    order of a 7B model's middle-layer residual stream). The values set the SAE's sparsity, not the cost of its dense
    maths.
    """
    gen = torch.Generator().manual_seed(seed)
    dim_scale = torch.exp(0.5 * torch.randn(d_in, generator=gen))
    dim_scale[torch.randperm(d_in, generator=gen)[: max(1, d_in // 256)]] *= 20.0
    dim_scale *= 2.0 / dim_scale.pow(2).mean().sqrt()  # E||D g||^2 = 4 d_in
    mean = torch.randn(d_in, generator=gen)
    mean *= 0.5 * 2.0 * math.sqrt(d_in) / mean.norm()
    token_scale = torch.exp(0.5 * torch.randn(tokens, 1, generator=gen))
    x = mean + torch.randn(tokens, d_in, generator=gen) * dim_scale * token_scale
    return x.float().contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# The three trainers
# ---------------------------------------------------------------------------------------------------------------------


def base_model_with_hidden_size(d_in: int):
    """A 1-layer Llama causal LM of hidden size d_in with the tiny tokenizer: SAEVTrainer needs a model to read d_in
    from and to build its LayerReader; it is never run here (batches and input_scale are given)."""
    from transformers import LlamaForCausalLM

    tiny, tokenizer = build_tiny_model("text")
    config = copy.deepcopy(tiny.config)
    config.hidden_size = d_in
    config.intermediate_size = 2 * d_in
    config.num_hidden_layers = 1
    config.num_attention_heads = 4
    config.num_key_value_heads = 4
    config.head_dim = d_in // 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def saev_trainer(shape: Shape, input_scale: float, max_steps: int, output_dir: str, warmups: bool = True,
                 device: str = "cpu"):
    """saev_hf's `SAEVTrainer` for `shape`, on the CPU (`device="cpu"`) or the accelerator accelerate picks (the SAE-V
    trains where the layer it reads runs: the tiny base model is put there)."""
    import datasets

    model, tokenizer = base_model_with_hidden_size(shape.d_in)
    dataset = datasets.Dataset.from_dict({"prompt": ["never read"]})
    args = SAEVTrainingArguments(
        layer=0,
        output_dir=output_dir,
        expansion_factor=shape.expansion,
        l1_coefficient=L1_COEFFICIENT,
        input_scale=input_scale,
        max_steps=max_steps,
        train_batch_size_tokens=shape.batch,
        buffer_size_tokens=2 * shape.batch,
        save_steps=0,
        disable_tqdm=True,
        report_to="none",
        **({} if warmups else {"lr_warmup_steps": 0, "lr_decay_steps": 0, "l1_warmup_steps": 0}),
    )
    if device != "cpu":
        model.to(choose_device())
    trainer = SAEVTrainer(args, model=model, processor=tokenizer, train_dataset=dataset)
    assert trainer.sae.config.d_in == shape.d_in and trainer.sae.config.d_sae == shape.d_sae
    return trainer


class SAELensStep:
    """A real `SAETrainer` on a `StandardTrainingSAE` configured as the paper's recipe; `__call__` runs the body of
    `SAETrainer.fit`'s loop for one batch (wandb logging off, as in a run with `log_to_wandb=False`)."""

    def __init__(self, shape: Shape, trainer: SAEVTrainer, input_scale: float, device: str = "cpu") -> None:
        from sae_lens import LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
        from tqdm.auto import tqdm

        args, schedule = trainer.args, trainer.schedule
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                d_in=shape.d_in,
                d_sae=shape.d_sae,
                l1_coefficient=args.l1_coefficient,
                l1_warm_up_steps=schedule.l1_warmup_steps,
                apply_b_dec_to_input=False,
                normalize_activations="none",
                decoder_init_norm=0.1,
                dtype="float32",
                device=device,
            )
        )
        with torch.no_grad():  # the same initial weights as saev_hf's SAE
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(trainer.sae, name))
        config = SAETrainerConfig(
            total_training_samples=schedule.max_steps * shape.batch,
            train_batch_size_samples=shape.batch,
            lr=args.learning_rate,
            lr_end=args.learning_rate,
            lr_scheduler_name="constant",
            lr_warm_up_steps=schedule.lr_warmup_steps,
            lr_decay_steps=schedule.lr_decay_steps,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            device=device,
            dead_feature_window=args.dead_feature_window,
            n_checkpoints=0,
            logger=LoggingConfig(log_to_wandb=False),
        )
        self.trainer = SAETrainer(cfg=config, sae=sae, data_provider=iter(()))
        # The paper's input scale s = sqrt(d_in) / E||x|| is SAELens's "expected_average_only_in" normalisation, which
        # SAELens 6 applies in SAETrainer.step through its ActivationScaler (fit() would estimate it first). Setting the
        # factor gives SAELens the same inputs and the same multiply that saev_hf does inside its forward.
        self.trainer.activation_scaler.scaling_factor = input_scale
        self.pbar = tqdm(total=config.total_training_samples, disable=True)
        self.sae = sae

    def __call__(self, batch: torch.Tensor):
        t = self.trainer
        t.maybe_reset_sparsity()  # returns a log dict at window ends; only sent to wandb when logging is on
        output = t.step(batch)
        t._checkpoint_if_needed()
        t.n_training_steps += 1
        t._update_pbar(output, self.pbar)
        return output


class PlainStep:
    """The same SAE maths with nothing else: the floor of a training step in PyTorch eager mode."""

    def __init__(self, trainer: SAEVTrainer, input_scale: float) -> None:
        args = trainer.args
        self.params = {
            name: getattr(trainer.sae, name).detach().clone().requires_grad_(True)
            for name in ("W_enc", "b_enc", "W_dec", "b_dec")
        }
        self.optimizer = torch.optim.Adam(
            self.params.values(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )
        self.scale = input_scale
        self.l1 = args.l1_coefficient

    def __call__(self, batch: torch.Tensor):
        p = self.params
        x = batch * self.scale
        z = torch.relu(x @ p["W_enc"] + p["b_enc"])
        x_hat = z @ p["W_dec"] + p["b_dec"]
        mse = (x_hat - x).pow(2).sum(-1).mean()
        sparsity = (z * p["W_dec"].norm(dim=-1)).sum(-1).mean()
        loss = mse + self.l1 * sparsity
        loss.backward()
        torch.nn.utils.clip_grad_norm_(p.values(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# ---------------------------------------------------------------------------------------------------------------------
# Equivalence check (not timed)
# ---------------------------------------------------------------------------------------------------------------------


def check_same_maths(steps: int = 4) -> None:
    """Train the three side by side from the same weights with L1 and LR warm-up off: same losses, same weights."""
    shape = Shape(64, 4, 256)
    data = synthetic_activations(shape.d_in, steps * shape.batch, seed=1)
    batches = list(data.split(shape.batch))
    scale = input_scale_from_norms(shape.d_in, float(data.double().norm(dim=-1).sum()), len(data))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = saev_trainer(shape, scale, steps, tmp, warmups=False)
        trainer.args.logging_steps = 1  # log the loss of every step
        saelens, plain = SAELensStep(shape, trainer, scale), PlainStep(trainer, scale)
        losses = {"SAELens": [], "plain": []}

        def feed():
            for batch in batches:
                losses["SAELens"].append(float(saelens(batch).loss))
                losses["plain"].append(float(plain(batch)))
                yield batch

        trainer.train(feed())
        losses["saev_hf"] = [entry["loss"] for entry in trainer.log_history if "loss" in entry]
        for name in ("SAELens", "plain"):
            torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(losses["saev_hf"]), rtol=1e-4, atol=0)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            ours = getattr(trainer.sae, name).detach()
            torch.testing.assert_close(getattr(saelens.sae, name).detach(), ours, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(plain.params[name].detach(), ours, rtol=1e-4, atol=1e-6)
    print(f"check: {steps} steps from the same weights give the same losses and weights in all three "
          f"(losses {', '.join(f'{v:.4g}' for v in losses['saev_hf'])})", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def benchmark(shape: Shape, args: argparse.Namespace) -> dict:
    """Time saev_hf's, SAELens' and plain PyTorch's training steps on `shape`, interleaved; return its row."""
    data = synthetic_activations(shape.d_in, args.num_batches * shape.batch, seed=0)
    norms = data.double().norm(dim=-1)
    scale = input_scale_from_norms(shape.d_in, float(norms.sum()), len(data))
    batches = list(data.split(shape.batch))
    rounds = args.warmup + args.steps + 1  # saev_hf's last step is not measured (no batch is asked for after it)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = saev_trainer(shape, scale, rounds, tmp)
        others = {"SAELens": SAELensStep(shape, trainer, scale), "plain": PlainStep(trainer, scale)}
        times: dict[str, list[float]] = {name: [] for name in LIBRARIES}
        profiles = {name: cProfile.Profile() for name in LIBRARIES} if args.profile == "python" else None

        def feed():
            resumed = None
            for k in range(rounds):
                asked = time.perf_counter()
                if resumed is not None:
                    times["saev_hf"].append(asked - resumed)
                    if profiles is not None:
                        profiles["saev_hf"].disable()
                batch = batches[k % len(batches)]
                names = list(others) if k % 2 == 0 else list(others)[::-1]  # alternate the order every round
                profiled = profiles is not None and args.warmup <= k < args.warmup + args.steps  # measured steps
                for name in names:
                    if profiled:
                        profiles[name].enable()
                    start = time.perf_counter()
                    others[name](batch)
                    times[name].append(time.perf_counter() - start)
                    if profiled:
                        profiles[name].disable()
                if profiled:
                    profiles["saev_hf"].enable()
                resumed = time.perf_counter()
                yield batch

        gc.collect()
        gc.disable()
        try:
            trainer.train(feed())
        finally:
            gc.enable()
        l0 = float((trainer.export_sae()(batches[0]).feature_acts > 0).sum(-1).float().mean())

    measured = {name: values[args.warmup : args.warmup + args.steps] for name, values in times.items()}
    assert all(len(values) == args.steps for values in measured.values()), {k: len(v) for k, v in measured.items()}
    row = {"shape": shape, "norm": float(norms.median()), "l0": l0, "profiles": profiles}
    for name, values in measured.items():
        row[f"{name}_ms"] = 1e3 * statistics.median(values)
        row[f"{name}_tps"] = shape.batch / statistics.median(values)
    for other in ("SAELens", "plain"):
        ratios = [t_other / t_ours for t_other, t_ours in zip(measured[other], measured["saev_hf"])]
        row[f"vs_{other}"] = statistics.median(ratios)
        row[f"vs_{other}_iqr"] = quartiles(ratios)
    return row


def op_profile(shape: Shape, rows: int, steps: int = 2) -> None:
    """torch.profiler over `steps` steps of each library (after one untimed step), aten ops grouped by input shape."""
    from torch.profiler import ProfilerActivity, profile

    data = synthetic_activations(shape.d_in, 2 * shape.batch, seed=0)
    scale = input_scale_from_norms(shape.d_in, float(data.double().norm(dim=-1).sum()), len(data))
    batches = list(data.split(shape.batch))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = saev_trainer(shape, scale, steps + 2, tmp)
        libraries = {"SAELens": SAELensStep(shape, trainer, scale), "plain": PlainStep(trainer, scale)}
        profilers = {name: profile(activities=[ProfilerActivity.CPU], record_shapes=True) for name in LIBRARIES}

        def feed():
            for k in range(steps + 2):
                if k == steps + 1:
                    profilers["saev_hf"].stop()
                yield batches[k % 2]
                if k == 0:
                    profilers["saev_hf"].start()  # from saev_hf's step 1 to the request for batch steps + 1

        trainer.train(feed())
        for name, step in libraries.items():
            step(batches[0])
            with profilers[name]:
                for k in range(steps):
                    step(batches[(k + 1) % 2])
    for name, profiler in profilers.items():
        print(f"--- {shape}, {name}: aten ops over {steps} steps (torch.profiler, by self CPU time) ---")
        print(profiler.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48, max_shapes_column_width=60
        ), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line (checked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in ("64x16@4096", "512x8@4096",
                                                                                  "768x16@1024")],
        help="SAE shapes D_INxEXPANSION@BATCH_TOKENS (default: 64x16@4096 512x8@4096 768x16@1024)",
    )
    parser.add_argument("--steps", type=int, default=15, help="timed steps per library and shape (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per library first")
    parser.add_argument("--num-batches", type=int, default=8, help="distinct activation batches, cycled")
    parser.add_argument("--skip-check", action="store_true", help="skip the same-maths check before timing")
    parser.add_argument(
        "--profile", choices=("python", "ops"),
        help="also show where each library's step time goes: 'python' cProfiles the timed steps (Python functions "
             "and torch calls; the profiler slows Python-heavy code, so read ratios from a run without it); 'ops' "
             "runs torch.profiler over 2 extra steps of each, after the timing, and lists aten ops by input shape",
    )
    parser.add_argument("--profile-lines", type=int, default=20, help="rows listed per profile")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.num_batches < 1:
        parser.error("--steps and --num-batches must be positive, --warmup non-negative")
    return args


def main(argv=None) -> None:
    """Check the same maths, time every shape and print the markdown table (and the profiles, if asked)."""
    args = parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" when SAEVTrainer saves the SAE after the last step
    start = time.perf_counter()
    if not args.skip_check:
        check_same_maths()
    rows = []
    for shape in args.shapes:
        row = benchmark(shape, args)
        rows.append(row)
        print(
            f"{shape}: d_sae {shape.d_sae}, median token norm {row['norm']:.1f}, L0 after training {row['l0']:.0f}; "
            f"median step saev_hf {row['saev_hf_ms']:.1f} ms, SAELens {row['SAELens_ms']:.1f} ms, plain "
            f"{row['plain_ms']:.1f} ms",
            flush=True,
        )
        for name, profile in (row["profiles"] or {}).items():
            stream = io.StringIO()
            pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(args.profile_lines)
            print(f"--- {shape}, {name}: {args.steps} measured steps, by own time ---")
            print(stream.getvalue().strip() + "\n", flush=True)
        if args.profile == "ops":
            op_profile(shape, args.profile_lines)

    import sae_lens
    import accelerate

    print(
        f"\nSAE training step, saev_hf SAEVTrainer vs SAELens {sae_lens.__version__} SAETrainer vs plain PyTorch; "
        f"torch {torch.__version__}, accelerate {accelerate.__version__}, {torch.get_num_threads()} thread, fp32, "
        f"synthetic activations; median of {args.steps} interleaved steps after {args.warmup} warm-up.\n"
    )
    print(
        "| d_in | d_sae | batch (tokens) | saev_hf (tok/s) | SAELens (tok/s) | plain PyTorch (tok/s) "
        "| **saev_hf / SAELens** | saev_hf / plain |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        shape = row["shape"]
        (a, b), (c, d) = row["vs_SAELens_iqr"], row["vs_plain_iqr"]
        print(
            f"| {shape.d_in} | {shape.d_sae} | {shape.batch} | {row['saev_hf_tps']:,.0f} | {row['SAELens_tps']:,.0f} "
            f"| {row['plain_tps']:,.0f} | **{row['vs_SAELens']:.2f}x** (IQR {a:.2f}-{b:.2f}) "
            f"| {row['vs_plain']:.2f}x (IQR {c:.2f}-{d:.2f}) |"
        )
    print(f"\nTotal wall time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
