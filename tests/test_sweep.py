"""Several SAE-Vs from one pass of activations: each member equals its separate run, its own folder, resume, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_training import digit_dataset, tiny_args

from saev_hf import SAEV
from saev_hf.training.buffer import ActivationBuffer
from saev_hf.cli import main as cli_main
from saev_hf.training import SWEEP_FIELDS, parse_sweep, sweep_members
from saev_hf.training import SAEVTrainer, train_saev, train_saevs

# three members that differ in the L1 coefficient, the width and the activation
SWEEP = [{"l1_coefficient": 1}, {"l1_coefficient": 5, "expansion_factor": 8}, {"activation": "topk", "k": 8}]
NAMES = ["l1_coefficient=1", "l1_coefficient=5,expansion_factor=8", "activation=topk,k=8"]


def assert_same_sae(a: SAEV, b: SAEV, what: str = "") -> None:
    """Bit for bit (feature_weights are NaN: never computed)."""
    config_a, config_b = ({k: v for k, v in sae.config.to_dict().items() if k != "_name_or_path"} for sae in (a, b))
    assert config_a == config_b, what
    for name, tensor in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[name], tensor, rtol=0, atol=0, equal_nan=True, msg=f"{what} {name}")


@pytest.fixture(scope="module")
def sweep_run(tiny_model_factory, tmp_path_factory):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(24)
    root = tmp_path_factory.mktemp("sweep")
    args = tiny_args(root / "sweep", max_steps=30, dead_feature_window=10)
    reads = []
    trainer = SAEVTrainer(args, llava.model, llava.processor, dataset, sweep=SWEEP)
    read_tokens = ActivationBuffer.read_tokens

    def counted_read(buffer):
        reads.append(1)
        return read_tokens(buffer)

    ActivationBuffer.read_tokens = counted_read
    try:
        saes = trainer.train()
        sweep_reads = len(reads)
        reads.clear()
        separate = {member.name: train_saev(dataclasses.replace(member.args, output_dir=str(root / member.name)),
                                            llava.model, llava.processor, dataset) for member in trainer.members}
    finally:
        ActivationBuffer.read_tokens = read_tokens
    return {"llava": llava, "dataset": dataset, "root": root, "args": args, "trainer": trainer, "saes": saes,
            "separate": separate, "sweep_reads": sweep_reads, "separate_reads": len(reads)}


def test_each_member_equals_a_separate_run_with_its_arguments(sweep_run):
    saes, separate = sweep_run["saes"], sweep_run["separate"]
    assert list(saes) == NAMES
    for name in NAMES:
        assert_same_sae(saes[name], separate[name], name)
        assert_same_sae(SAEV.from_pretrained(sweep_run["args"].output_dir + "/" + name), separate[name], name)
    # the members really differ: their own L1, width and activation
    assert [saes[n].config.d_sae for n in NAMES] == [256, 512, 256]
    assert [saes[n].config.l1_coefficient for n in NAMES] == [1.0, 5.0, 1.0]
    assert saes[NAMES[2]].config.activation == "topk" and saes[NAMES[2]].config.k == 8
    assert not torch.equal(saes[NAMES[0]].W_enc, saes[NAMES[2]].W_enc)
    # and each trained, on its own metrics
    for name in NAMES:
        state = json.loads((Path(sweep_run["args"].output_dir) / name / "trainer_state.json").read_text())
        separate_state = json.loads((sweep_run["root"] / name / "trainer_state.json").read_text())
        assert state["log_history"] == separate_state["log_history"]
        history = [h for h in state["log_history"] if "mse_loss" in h]
        assert history[-1]["mse_loss"] < history[0]["mse_loss"]


def test_the_sweep_reads_the_activations_once(sweep_run):
    # three separate runs read the base model three times as often as the sweep of three
    assert sweep_run["sweep_reads"] > 0
    assert sweep_run["separate_reads"] == 3 * sweep_run["sweep_reads"]


def test_each_member_folder_holds_what_a_single_run_writes_and_the_manifest_lists_them(sweep_run):
    root, args = Path(sweep_run["args"].output_dir), sweep_run["args"]
    manifest = json.loads((root / "sweep.json").read_text())
    assert manifest["finished"] is True and manifest["global_step"] == 30 and manifest["num_processes"] == 1
    assert [m["name"] for m in manifest["sweep"]] == NAMES == [m["folder"] for m in manifest["sweep"]]
    assert [m["overrides"] for m in manifest["sweep"]] == [
        {"l1_coefficient": 1.0}, {"l1_coefficient": 5.0, "expansion_factor": 8}, {"activation": "topk", "k": 8}]
    assert manifest["args"] == args.to_dict()
    assert all("mse_loss" in m["final_metrics"] for m in manifest["sweep"])
    assert sorted(p.name for p in root.iterdir()) == sorted(["sweep.json", *NAMES])
    for name in NAMES:
        assert sorted(p.name for p in (root / name).iterdir()) == sorted(p.name for p in (sweep_run["root"] / name)
                                                                           .iterdir())
        recorded = json.loads((root / name / "training_args.json").read_text())
        assert recorded["args"]["output_dir"] == str(root / name)
    recorded = json.loads((root / NAMES[1] / "training_args.json").read_text())["args"]
    assert (recorded["l1_coefficient"], recorded["expansion_factor"], recorded["activation"]) == (5.0, 8, "relu")


def test_each_member_logs_to_the_trackers_under_its_name(tiny_text_model, tmp_path, monkeypatch):
    from test_training import text_dataset

    trainer = SAEVTrainer(tiny_args(tmp_path / "out", max_steps=10, logging_steps=5, dead_feature_window=5),
                          tiny_text_model.model, tiny_text_model.processor, text_dataset(8),
                          sweep={"l1_coefficient": [1, 2]})
    logged = []
    monkeypatch.setattr(trainer.accelerator, "log", lambda values, step: logged.append((step, values)))
    trainer.train()
    assert [step for step, _ in logged] == [5, 10]  # one call per logging step, for all members
    for _, values in logged:
        assert {"l1_coefficient=1/loss", "l1_coefficient=2/loss", "l1_coefficient=2/dead_features"} <= set(values)
        assert values["l1_coefficient=2/l1_coefficient"] == 2 * values["l1_coefficient=1/l1_coefficient"]
    assert trainer.runs[1].log_history[-1]["loss"] == logged[-1][1]["l1_coefficient=2/loss"]


# ----------------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------------


def test_saev_train_sweep_command_trains_every_combination_of_a_grid(tiny_model_factory, tmp_path, capsys):
    llava = tiny_model_factory("llava")
    digit_dataset(8).save_to_disk(str(tmp_path / "data"))
    common = ["train", "--model_name_or_path", str(llava.path), "--dataset_name", str(tmp_path / "data"),
              "--layer", "1", "--max_steps", "6", "--train_batch_size_tokens", "32", "--buffer_size_tokens", "128",
              "--read_batch_size", "4", "--input_scale_estimation_tokens", "64", "--disable_tqdm"]
    grid = '{"l1_coefficient": [1, 5], "expansion_factor": [2, 4]}'
    assert cli_main([*common, "--output_dir", str(tmp_path / "grid"), "--sweep", grid]) == 0
    names = ["l1_coefficient=1,expansion_factor=2", "l1_coefficient=1,expansion_factor=4",
             "l1_coefficient=5,expansion_factor=2", "l1_coefficient=5,expansion_factor=4"]
    assert [m["name"] for m in json.loads((tmp_path / "grid" / "sweep.json").read_text())["sweep"]] == names
    for name in names:
        sae = SAEV.from_pretrained(tmp_path / "grid" / name)
        assert sae.config.d_sae == 64 * int(name[-1]) and sae.config.l1_coefficient == float(name.split(",")[0][-1])
        assert sae.config.training_tokens == 6 * 32
    out = capsys.readouterr().out
    assert "Trained 4 SAE-Vs on the same 192 tokens" in out and "l1_coefficient=5,expansion_factor=4: 256" in out

    # a list of overrides in a JSON file
    (tmp_path / "sweep.json").write_text(json.dumps([{"activation": "topk", "k": 4}, {"l1_coefficient": 2}]))
    assert cli_main([*common, "--output_dir", str(tmp_path / "list"), "--expansion_factor", "2",
                     "--sweep", str(tmp_path / "sweep.json")]) == 0
    assert SAEV.from_pretrained(tmp_path / "list" / "activation=topk,k=4").config.k == 4
    assert SAEV.from_pretrained(tmp_path / "list" / "l1_coefficient=2").config.activation == "relu"


def test_saev_train_help_documents_the_sweep_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--sweep SWEEP" in out and "one pass of activations" in out and "dead_feature_threshold" in out


def test_saev_train_sweep_refuses_a_shared_option_with_a_message(tmp_path, capsys):
    with pytest.raises(ValueError, match="'layer' cannot vary within a sweep"):
        cli_main(["train", "--model_name_or_path", "m", "--dataset_name", "d", "--layer", "1", "--output_dir",
                  str(tmp_path / "x"), "--sweep", '{"layer": [1, 2]}'])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------------
# What a sweep refuses
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"layer": [1, 2]}, "'layer' cannot vary within a sweep: every member trains on the same activation stream"),
        ({"train_batch_size_tokens": [32, 64]}, "Set it once (--train_batch_size_tokens) for the whole sweep"),
        ([{"seed": 1}, {"seed": 2}], "'seed' cannot vary within a sweep"),
        ({"max_steps": [10, 20]}, "'max_steps' cannot vary within a sweep"),
        ({"input_scale": [1.0, 2.0]}, "'input_scale' cannot vary within a sweep"),
        ({"output_dir": ["a", "b"]}, "'output_dir' cannot vary within a sweep"),
        ({"l1": [1, 5]}, "Sweep option 'l1' is not a training option. Options a sweep may vary: l1_coefficient"),
        ({}, "The sweep grid is empty"),
        ([], "The sweep is an empty list"),
        ({"l1_coefficient": []}, "'l1_coefficient': [] must be a non-empty list of values"),
        ({"l1_coefficient": 5}, "'l1_coefficient': 5 must be a non-empty list of values"),
        ([{"l1_coefficient": 2}, {"l1_coefficient": 2.0}], "train the same SAE-V. Remove one of them."),
        ([{"l1_coefficient": 1}, {"learning_rate": 1e-3}], "'l1_coefficient=1' and 'learning_rate=0.001' train the same"),
        ([{"activation": "topk"}], "Sweep member 'activation=topk': activation='topk' needs k"),
        ("{not json", "The sweep is not valid JSON"),
        ("no-such-file.json", "is neither JSON"),
    ],
)
def test_a_sweep_that_cannot_share_one_pass_is_refused_with_the_fix(tmp_path, sweep, message):
    args = tiny_args(tmp_path / "out")  # l1_coefficient=1.0 and learning_rate=1e-3: the base equals both members
    with pytest.raises(ValueError) as error:
        sweep_members(args, sweep)
    assert message in str(error.value)


def test_the_trainer_refuses_a_bad_sweep_before_reading_anything(tmp_path):
    with pytest.raises(ValueError, match="'seed' cannot vary"):
        train_saevs(tiny_args(tmp_path / "out"), {"seed": [1, 2]})  # no model, no data: refused first
    assert not (tmp_path / "out").exists()


def test_member_overrides_replace_the_exclusive_options_they_conflict_with(tmp_path):
    args = tiny_args(tmp_path / "out", expansion_factor=None, d_sae=128, activation="topk", k=4)
    relu, wide = sweep_members(args, [{"activation": "relu"}, {"expansion_factor": 8}])
    assert (relu.args.activation, relu.args.k, relu.args.d_sae) == ("relu", None, 128)
    assert (wide.args.expansion_factor, wide.args.d_sae, wide.args.k) == (8, None, 4)
    assert wide.args.output_dir == str(tmp_path / "out" / "expansion_factor=8")
    assert set(SWEEP_FIELDS) >= {"l1_coefficient", "expansion_factor", "d_sae", "activation", "k", "learning_rate"}
    assert parse_sweep('{"k": [1, 2], "l1_coefficient": [3]}') == [{"k": 1, "l1_coefficient": 3},
                                                                  {"k": 2, "l1_coefficient": 3}]


def test_an_output_dir_holding_a_single_run_or_another_sweep_is_refused(tiny_text_model, tmp_path):
    from test_training import text_dataset

    model, tokenizer, dataset = tiny_text_model.model, tiny_text_model.processor, text_dataset(8)
    train_saev(tiny_args(tmp_path / "single", max_steps=4), model, tokenizer, dataset)
    with pytest.raises(FileExistsError, match="already holds files that no sweep wrote"):
        SAEVTrainer(tiny_args(tmp_path / "single", max_steps=4), model, tokenizer, dataset, sweep={"l1_coefficient": [2]})
    train_saevs(tiny_args(tmp_path / "sweep", max_steps=4), {"l1_coefficient": [1, 2]}, model, tokenizer, dataset)
    SAEVTrainer(tiny_args(tmp_path / "sweep", max_steps=4), model, tokenizer, dataset,
                sweep={"l1_coefficient": [1, 2]})  # its own earlier output: accepted
    with pytest.raises(ValueError) as error:
        SAEVTrainer(tiny_args(tmp_path / "sweep", max_steps=4), model, tokenizer, dataset,
                    sweep={"l1_coefficient": [1, 3]})
    assert "holds a different sweep" in str(error.value) and "'l1_coefficient=3'" in str(error.value)
    with pytest.raises(FileExistsError, match="already holds files that no training run wrote"):
        SAEVTrainer(tiny_args(tmp_path / "sweep", max_steps=4), model, tokenizer, dataset)  # a single run


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ----------------------------------------------------------------------------------------------------------------------


def test_a_resumed_sweep_gives_the_uninterrupted_sweep(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    dataset = digit_dataset(16)
    sweep = [{"l1_coefficient": 3}, {"activation": "topk", "k": 8, "learning_rate": 2e-3}]
    names = ["l1_coefficient=3", "activation=topk,k=8,learning_rate=0.002"]
    full = tiny_args(tmp_path / "full", max_steps=30, save_steps=10, save_total_limit=None)
    uninterrupted = train_saevs(full, sweep, llava.model, llava.processor, dataset)
    checkpoint = tmp_path / "full" / "checkpoint-20"
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    for name in names:  # each member's state and a loadable SAE-V, in its folder of the checkpoint
        assert json.loads((checkpoint / name / "trainer_state.json").read_text())["global_step"] == 20
        assert SAEV.from_pretrained(checkpoint / name / "saev").config.training_tokens == 20 * 32
    assert json.loads((checkpoint / "trainer_state.json").read_text())["members"] == names

    resumed_args = tiny_args(tmp_path / "resumed", max_steps=30, save_steps=10, resume_from_checkpoint=str(checkpoint))
    trainer = SAEVTrainer(resumed_args, llava.model, llava.processor, dataset, sweep=sweep)
    resumed = trainer.train()
    assert trainer.global_step == 30
    for run, name in zip(trainer.runs, names):
        assert_same_sae(resumed[name], uninterrupted[name], name)
        full_state = json.loads((tmp_path / "full" / name / "trainer_state.json").read_text())
        assert run.log_history == full_state["log_history"]
    # resuming needs the same sweep
    with pytest.raises(ValueError, match="different settings: sweep: .*'l1_coefficient=3'.* vs .*'l1_coefficient=4'"):
        SAEVTrainer(tiny_args(tmp_path / "other", max_steps=30, save_steps=10, resume_from_checkpoint=str(checkpoint)),
                    llava.model, llava.processor, dataset, sweep=[{"l1_coefficient": 4}, sweep[1]])
    with pytest.raises(ValueError, match="sweep: .* \\(saved\\) vs no sweep"):
        SAEVTrainer(tiny_args(tmp_path / "other", max_steps=30, save_steps=10, resume_from_checkpoint=str(checkpoint)),
                    llava.model, llava.processor, dataset)


def test_a_sweep_from_an_activation_cache_equals_separate_runs_from_it(tiny_model_factory, tmp_path):
    from saev_hf.cache import ActivationCache, CacheArguments, cache_activations

    llava = tiny_model_factory("llava")
    cache = cache_activations(CacheArguments(output_dir=str(tmp_path / "cache"), layer=1, read_batch_size=4,
                                             disable_tqdm=True),
                              model=llava.model, processor=llava.processor, dataset=digit_dataset(12))
    args = tiny_args(tmp_path / "sweep", max_steps=15)
    trainer = SAEVTrainer(args, train_dataset=ActivationCache(cache), sweep={"activation": ["relu"],
                                                                             "l1_coefficient": [2, 4]})
    saes = trainer.train()
    assert list(saes) == ["activation=relu,l1_coefficient=2", "activation=relu,l1_coefficient=4"]
    for member in trainer.members:
        separate = train_saev(dataclasses.replace(member.args, output_dir=str(tmp_path / member.name)),
                              dataset=ActivationCache(cache))
        assert_same_sae(saes[member.name], separate, member.name)


def test_docstring_examples_run():
    import doctest

    import saev_hf.training.sweep

    results = doctest.testmod(saev_hf.training.sweep)
    assert results.attempted >= 1 and results.failed == 0


# --- a diverging run is never saved as trained (issue 28, item 8) -----------------------------------------------------


def test_a_diverging_run_stops_with_an_error_and_saves_nothing(tiny_model_factory, tmp_path):
    llava = tiny_model_factory("llava")
    args = tiny_args(tmp_path / "diverged", max_steps=12, learning_rate=1e30, logging_steps=4)
    with pytest.raises(ValueError, match=r"Training diverged: its (loss became nan between steps \d+ and \d+|weights "
                                         r"held NaN).*Nothing was saved.*Lower learning_rate"):
        train_saev(args, llava.model, llava.processor, digit_dataset(8))
    assert not (tmp_path / "diverged" / "model.safetensors").exists()


def test_a_diverging_sweep_member_is_marked_and_not_saved_and_the_others_are(tiny_model_factory, tmp_path, capsys):
    from saev_hf.cli import console

    llava = tiny_model_factory("llava")
    digit_dataset(8).save_to_disk(str(tmp_path / "data"))
    argv = ["train", "--model_name_or_path", str(llava.path), "--dataset_name", str(tmp_path / "data"), "--layer", "1",
            "--output_dir", str(tmp_path / "sweep"), "--expansion_factor", "2", "--max_steps", "12",
            "--logging_steps", "4", "--train_batch_size_tokens", "32", "--buffer_size_tokens", "128",
            "--read_batch_size", "4", "--input_scale_estimation_tokens", "64", "--disable_tqdm",
            "--sweep", json.dumps({"learning_rate": [1e-3, 1e30]})]
    assert console(argv) == 1
    captured = capsys.readouterr()
    assert "1 of 2 sweep members diverged and were not saved: learning_rate=1e+30: its" in captured.err
    assert "Trained" not in captured.out
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [member["diverged"] is None for member in manifest["sweep"]] == [True, False]
    assert SAEV.from_pretrained(tmp_path / "sweep" / "learning_rate=0.001").config.training_tokens == 12 * 32
    assert not (tmp_path / "sweep" / "learning_rate=1e+30" / "model.safetensors").exists()


@pytest.mark.parametrize("sweep, message", [
    ({"l1_coefficient": ["a", 5]}, r"Sweep member \{'l1_coefficient': 'a'\}: l1_coefficient='a' must be float, not str"),
    ({"learning_rate": [True]}, r"learning_rate=True must be float, not bool"),
    ({"expansion_factor": ["8"]}, r"expansion_factor='8' must be int or None, not str"),
])
def test_a_sweep_value_of_the_wrong_type_names_the_member_and_the_option(tmp_path, sweep, message):
    with pytest.raises(ValueError, match=message):
        sweep_members(tiny_args(tmp_path), sweep)
