"""Layer-restricted fine-tuning: frozen parameters stay put, runs resume bit-identically, bad inputs raise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avss_lib.mitigation.contrastive_loss import ContrastiveExample, combined_loss, score_examples
from avss_lib.core.errors import ConfigError
from avss_lib.core.layers import find_layers
from avss_lib.testing.tiny_models import tiny_model, tiny_tokenizer
from avss_lib.mitigation.training import TrainConfig, batch_indices, count_trainable, freeze_all_but, train

TOK = tiny_tokenizer()
EXAMPLES = [
    ContrastiveExample("e0", "Q: capital of France?\nA:", " Paris", (" Rome", " Lyon")),
    ContrastiveExample("e1", "Q: two plus two?\nA:", " 4", (" 5",)),
    ContrastiveExample("e2", "Q: colour of sky?\nA:", " blue", (" green", " red", " pink")),
    ContrastiveExample("e3", "Q: largest planet?\nA:", " Jupiter", (" Mars",)),
    ContrastiveExample("e4", "Q: author of Emma?\nA:", " Austen", (" Dickens", " Bronte")),
]


def _config(**overrides: object) -> TrainConfig:
    base = dict(layers=(1, 2), steps=6, lr=1e-2, batch_size=2, checkpoint_every=2, seed=0)
    return TrainConfig(**(base | overrides))  # type: ignore[arg-type]


def _run(model_type: str, config: TrainConfig, directory: Path | None, **kwargs: object) -> torch.nn.Module:
    model = tiny_model(model_type, n_layers=4, seed=0)
    train(model, TOK, EXAMPLES, config, dataset="toy", checkpoint_dir=directory, progress=False, **kwargs)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("loss", ["infonce", "margin"])
def test_frozen_parameters_stay_bit_identical(loss: str) -> None:
    model = tiny_model("llama", n_layers=4, seed=0)
    before = _state(model)
    result = train(model, TOK, EXAMPLES, _config(steps=3, loss=loss, margin=5.0), dataset="toy", progress=False)
    after = _state(model)
    trained_prefixes = ("model.layers.1.", "model.layers.2.")
    for name, value in before.items():
        if name.startswith(trained_prefixes):
            continue
        assert torch.equal(value, after[name]), name
    changed = [n for n in before if n.startswith(trained_prefixes) and not torch.equal(before[n], after[n])]
    assert any(".self_attn." in n for n in changed) and any(".mlp." in n for n in changed)
    assert list(result.log.step) == [1, 2, 3]
    assert not model.training  # mode restored


def test_logged_loss_is_the_objective_of_the_steps_batch() -> None:
    config = _config(steps=1)
    model = tiny_model("llama", n_layers=4, seed=0)  # no dropout: train and eval mode give the same loss
    batch = [EXAMPLES[i] for i in batch_indices(len(EXAMPLES), config.batch_size, config.seed, 0)]
    with torch.no_grad():
        scored = score_examples(model, TOK, batch, max_length=config.max_length)
        parts = combined_loss(scored.pos, scored.neg_scores, scored.neg_mask)  # lambda_con = lambda_lm = 1
    row = train(model, TOK, EXAMPLES, config, dataset="toy", progress=False).log.iloc[0]
    assert row["loss"] == pytest.approx(parts.total.item(), rel=1e-5)
    assert row["loss_con"] == pytest.approx(parts.con.item(), rel=1e-5)
    assert row["loss_lm"] == pytest.approx(parts.lm.item(), rel=1e-5)
    assert row["loss"] == pytest.approx(row["loss_con"] + row["loss_lm"], rel=1e-6)
    assert row["score_pos"] == pytest.approx(scored.pos.score(config.score).mean().item(), rel=1e-5)


def test_lm_only_ablation_runs_without_negatives() -> None:
    examples = [ContrastiveExample(ex.id, ex.prompt, ex.positive, ()) for ex in EXAMPLES]
    model = tiny_model("llama", n_layers=4, seed=0)
    result = train(model, TOK, examples, _config(steps=2, lambda_con=0.0), dataset="toy", progress=False)
    assert result.log.loss_con.isna().all()
    assert (result.log.loss == result.log.loss_lm).all()


class _Interrupt(Exception):
    pass


def _interrupt_at(step: int):
    def hook(row: dict[str, float]) -> None:
        if row["step"] == step:
            raise _Interrupt

    return hook


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2 has dropout, so RNG state must resume too
def test_resume_after_interruption_is_bit_identical(model_type: str, tmp_path: Path) -> None:
    config = _config()
    reference = _run(model_type, config, tmp_path / "a")
    with pytest.raises(_Interrupt):
        _run(model_type, config, tmp_path / "b", on_step=_interrupt_at(5))  # last checkpoint: step 4
    resumed_model = tiny_model(model_type, n_layers=4, seed=0)
    result = train(resumed_model, TOK, EXAMPLES, config, dataset="toy", checkpoint_dir=tmp_path / "b", progress=False)
    assert result.resumed_from_step == 4
    assert list(result.log.step) == [1, 2, 3, 4, 5, 6]
    ref_state, got_state = _state(reference), _state(resumed_model)
    assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)
    fresh = _state(tiny_model(model_type, n_layers=4, seed=0))
    assert not all(torch.equal(fresh[k], got_state[k]) for k in fresh)  # training did something


def test_extending_a_finished_run_matches_one_long_run(tmp_path: Path) -> None:
    reference = _run("llama", _config(steps=6), None)
    _run("llama", _config(steps=3), tmp_path)
    extended = _run("llama", _config(steps=6), tmp_path)
    ref_state, got_state = _state(reference), _state(extended)
    assert all(torch.equal(ref_state[k], got_state[k]) for k in ref_state)


def test_resume_with_a_different_config_raises(tmp_path: Path) -> None:
    _run("llama", _config(steps=2), tmp_path)
    with pytest.raises(ConfigError, match="different configuration"):
        _run("llama", _config(steps=4, lr=1e-3), tmp_path)
    with pytest.raises(ConfigError, match="beyond steps=1"):
        _run("llama", _config(steps=1), tmp_path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"layers": (1, 4)}, "outside 0..3"),
        ({"layers": (0, 1, 2, 3, 0)}, "k=5 layers"),
        ({"layers": ()}, "empty"),
        ({"layers": (1, 1)}, "duplicates"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"lr": -1e-4}, "lr=-0.0001"),
        ({"loss": "hinge"}, "unknown loss"),
        ({"lambda_con": 0.0, "lambda_lm": 0.0}, "not both 0"),
        ({"steps": 0}, "steps=0"),
    ],
)
def test_bad_config_raises(overrides: dict[str, object], match: str) -> None:
    model = tiny_model("llama", n_layers=4, seed=0)
    with pytest.raises(ConfigError, match=match):
        train(model, TOK, EXAMPLES, _config(**overrides), dataset="toy", progress=False)


def test_examples_without_negatives_raise_naming_the_dataset() -> None:
    examples = [*EXAMPLES, ContrastiveExample("bare", "Q: hm?\nA:", " ok", ())]
    model = tiny_model("llama", n_layers=4, seed=0)
    with pytest.raises(ConfigError, match=r"dataset 'truthfulqa-train'.*\['bare'\]"):
        train(model, TOK, examples, _config(), dataset="truthfulqa-train", progress=False)


def test_count_trainable_hand_computed() -> None:
    model = tiny_model("llama", n_layers=4, seed=0)
    # q 16x16 + k 16x8 + v 16x8 + o 16x16 + gate/up/down 3 x 16x32 + two RMSNorm weights of 16
    per_layer = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16
    assert count_trainable(model, [0, 3]) == 2 * per_layer
    trainable = freeze_all_but(model, [0, 3])
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer
    assert not any(p.requires_grad for p in find_layers(model).layers[1].parameters())


def test_batch_indices_walk_seeded_epoch_permutations() -> None:
    stream = [i for step in range(5) for i in batch_indices(5, 2, seed=3, step=step)]
    assert sorted(stream[:5]) == sorted(stream[5:]) == [0, 1, 2, 3, 4]
    assert stream[:5] != stream[5:10]  # each epoch is a fresh permutation
    assert batch_indices(5, 2, seed=3, step=2) == stream[4:6]  # crosses the epoch boundary
    assert batch_indices(5, 2, seed=4, step=0) != batch_indices(5, 2, seed=3, step=0)


def test_early_stopping_keeps_the_best_validation_state_and_resumes(tmp_path: Path, monkeypatch) -> None:
    """Scripted validation losses 3, 2, 2.5, 2.6: with patience 2 training stops after step 4 and keeps the
    parameters of step 2 — the same as a plain 2-step run; an interrupted run resumes to the same end."""
    import avss_lib.mitigation.training as training

    losses = iter([3.0, 2.0, 2.5, 2.6, 9.0, 9.0])
    monkeypatch.setattr(training, "validation_loss", lambda *a, **k: next(losses))
    config = _config(steps=10, validate_every=1, patience=2, checkpoint_every=100)
    model = tiny_model("llama", n_layers=4, seed=0)
    result = train(model, TOK, EXAMPLES[:4], config, dataset="toy", progress=False, validation=EXAMPLES[4:])
    assert result.best_step == 2 and result.steps_run == 4
    assert result.log["val_loss"].tolist() == [3.0, 2.0, 2.5, 2.6]
    plain = tiny_model("llama", n_layers=4, seed=0)
    train(plain, TOK, EXAMPLES[:4], _config(steps=2, checkpoint_every=100), dataset="toy", progress=False)
    for (name, a), b in zip(_state(model).items(), _state(plain).values()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="patience"):
        _config(patience=0).validate(4)


def test_early_stopping_state_survives_an_interruption(tmp_path: Path, monkeypatch) -> None:
    """Interrupted at the third validation, resumed from the step-2 checkpoint: the best state (step 2) came
    back from the checkpoint, and the run ends as the uninterrupted one does."""
    import avss_lib.mitigation.training as training

    def scripted(values):
        def loss(*args, **kwargs):
            value = values.pop(0)
            if value is None:
                raise KeyboardInterrupt
            return value
        return loss

    config = _config(steps=10, validate_every=1, patience=2, checkpoint_every=1)
    model = tiny_model("llama", n_layers=4, seed=0)
    monkeypatch.setattr(training, "validation_loss", scripted([3.0, 2.0, None]))
    with pytest.raises(KeyboardInterrupt):
        train(model, TOK, EXAMPLES[:4], config, dataset="toy", checkpoint_dir=tmp_path, progress=False,
              validation=EXAMPLES[4:])
    monkeypatch.setattr(training, "validation_loss", scripted([2.5, 2.6]))
    resumed = tiny_model("llama", n_layers=4, seed=0)
    result = train(resumed, TOK, EXAMPLES[:4], config, dataset="toy", checkpoint_dir=tmp_path, progress=False,
                   validation=EXAMPLES[4:])
    assert result.resumed_from_step == 2 and result.best_step == 2 and result.steps_run == 4
    plain = tiny_model("llama", n_layers=4, seed=0)
    train(plain, TOK, EXAMPLES[:4], _config(steps=2, checkpoint_every=100), dataset="toy", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(_state(resumed).values(), _state(plain).values()))
