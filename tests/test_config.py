"""Presets against the papers' tables, and clear errors for bad configs."""

import pytest
import torch

from model.config import PRESETS, GPTConfig, config_for, preset
from model.errors import InstructflowError
from model.gpt import GPT


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.paper_params], ids=str)
def test_parameter_count_matches_paper(name):
    with torch.device("meta"):  # no memory: 175B parameters are only shapes here
        model = GPT(PRESETS[name].config)
    counted, paper = model.num_params(), PRESETS[name].paper_params
    assert abs(counted - paper) / paper <= 0.02, f"{name}: {counted / 1e6:.1f}M vs paper {paper / 1e6:.0f}M"


def test_tiny_is_small():
    assert GPT(preset("tiny").config).num_params() < 3_000_000


def test_gpt3_alternates_dense_and_sparse():
    config = preset("gpt3-small").config
    assert [config.is_sparse(i) for i in range(4)] == [False, True, False, True]
    assert not any(preset("gpt2").config.is_sparse(i) for i in range(12))


def test_gpt1_and_gpt2_differ_where_the_papers_do():
    gpt1, gpt2 = preset("gpt1").config, preset("gpt2").config
    assert (gpt1.norm, gpt1.final_norm, gpt1.block_size, gpt1.vocab_size) == ("post", False, 512, 40478)
    assert (gpt2.norm, gpt2.final_norm, gpt2.block_size, gpt2.vocab_size) == ("pre", True, 1024, 50257)
    assert preset("gpt3-175b").training.learning_rate == pytest.approx(0.6e-4)
    assert preset("gpt3-175b").training.batch_tokens == 3_200_000


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    proj = model.blocks[0].mlp.c_proj.weight.std().item()
    fc = model.blocks[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.05)
    assert proj == pytest.approx(0.02 / (2 * 8) ** 0.5, rel=0.05)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(InstructflowError, match="unknown model preset 'gpt4'.*tiny"):
        preset("gpt4")


def test_heads_must_divide_width():
    with pytest.raises(InstructflowError, match="n_embd=100 is not divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)


@pytest.mark.parametrize("field,value", [("norm", "middle"), ("attention", "sparse"), ("dropout", 1.5), ("n_layer", 0)])
def test_bad_field_values(field, value):
    with pytest.raises(InstructflowError, match=field):
        GPTConfig(**{field: value})


def test_overrides_and_round_trip():
    config = config_for("tiny", vocab_size=300)
    assert config.vocab_size == 300 and config.n_layer == preset("tiny").config.n_layer
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InstructflowError, match="bad override"):
        config_for("tiny", n_layers=3)
    with pytest.raises(InstructflowError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**config.to_dict(), "rotary": True})


@pytest.mark.parametrize("name", ["../x", "/abs/path", "a/b", "a\x00b", ".hidden", "a..b", "", "x/../y", "a\\b"])
def test_names_that_become_folders_cannot_escape_the_state_dir(name):
    from pydantic import ValidationError

    from tasks.params import RankParams, RewardParams

    for build in (lambda: RankParams(dataset=name), lambda: RankParams(round=name), lambda: RewardParams(dataset=name)):
        with pytest.raises(ValidationError, match="should match pattern"):
            build()
    assert RankParams(dataset="team-2", round="round-20261203T0900.1").dataset == "team-2"


def test_the_state_dir_is_private_to_its_user(tmp_path, monkeypatch):
    from tasks.settings import state_dir

    monkeypatch.setenv("INSTRUCTFLOW_STATE_DIR", str(tmp_path / "new" / "state"))
    assert state_dir().stat().st_mode & 0o777 == 0o700  # created so
    loose = tmp_path / "old"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    monkeypatch.setenv("INSTRUCTFLOW_STATE_DIR", str(loose))
    assert state_dir().stat().st_mode & 0o777 == 0o700  # made so
