import pytest
import torch

from liquid_diffusion import ConfigError, ExperimentConfig, LiquidUNet, ModelConfig
from liquid_diffusion.config import flatten_overrides


def count_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only; nothing is allocated
        return sum(p.numel() for p in LiquidUNet(cfg).parameters())


@pytest.mark.parametrize(
    "preset, parameters",
    [("micro", 3_457_284), ("tiny", 22_384_388), ("small", 68_774_788), ("base", 155_080_196)],
)
def test_preset_parameter_counts_at_4x32x32_are_the_readme_s(preset, parameters):
    """The counts are deterministic, so any change to a preset or a block shows here (and in the README)."""
    assert count_params(ModelConfig.preset(preset, in_channels=4, resolution=32)) == parameters


def test_micro_is_the_smallest_preset():
    sizes = [count_params(ModelConfig.preset(p)) for p in ("micro", "tiny", "small", "base")]
    assert sizes == sorted(sizes) and sizes[0] < 5e6


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_plain_conv_matches_the_cfc_mixer_in_every_block_to_one_hidden_unit(preset):
    from liquid_diffusion.model import LiquidDiffusionBlock

    def mixers(cfg):
        with torch.device("meta"):
            blocks = [m for m in LiquidUNet(cfg).modules() if isinstance(m, LiquidDiffusionBlock)]
        return [(b.mixer, sum(p.numel() for p in b.mixer.parameters())) for b in blocks]

    cfc, conv = mixers(ModelConfig.preset(preset)), mixers(ModelConfig.preset(preset, mixer="conv"))
    assert len(cfc) == len(conv) > 0
    for (_, cfc_count), (mixer, conv_count) in zip(cfc, conv):
        dim = mixer.expand.in_features  # one hidden unit holds 2 * dim + 1 parameters; rounding moves half of one
        assert abs(conv_count - cfc_count) <= (2 * dim + 1) / 2, (dim, cfc_count, conv_count)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"relx": "none"}, "relx"),
        ({"mixer": "transformer"}, "mixer"),
        ({"kernels": [3, 4]}, "kernels"),
        ({"kernels": []}, "kernels"),
        ({"resolution": 30}, "resolution"),
        ({"gate": "sometimes"}, "gate"),
        ({"relax": "x"}, "relax"),
        ({"in_channels": 2}, "in_channels"),
        ({"global_pool": "maybe"}, "global_pool"),
        ({"depths": [1, 1]}, "depths"),
        ({"ff_mult": 0}, "ff_mult"),
    ],
)
def test_bad_model_config_is_a_value_error_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("micro", **changes)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match="did you mean 'relax'"):
        ModelConfig.from_dict({"relx": "none"})


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="micro, tiny, small, base"):
        ModelConfig.preset("huge")


def test_on_off_spellings_and_lists_are_normalised():
    cfg = ModelConfig.from_dict({"global_pool": "off", "adaln": "on", "kernels": [3, 5]})
    assert cfg.global_pool is False and cfg.adaln is True and cfg.kernels == (3, 5)


def test_overrides_apply_by_dotted_key_and_reject_unknown_keys():
    base = ExperimentConfig()
    cfg = base.with_overrides(flatten_overrides({"model": {"relax": "t"}, "train.lr": 1e-4}))
    assert cfg.model.relax == "t" and cfg.train.lr == 1e-4 and base.model.relax == "temb"
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        base.with_overrides({"train.lrr": 1e-4})
    with pytest.raises(ConfigError, match="t_sampling"):
        base.with_overrides({"train.t_sampling": "beta"})


def test_flat_config_round_trips():
    cfg = ExperimentConfig().with_overrides({"model.kernels": [3], "train.ema_decay": 0.99})
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["model.kernels"] == [3]


def test_yaml_spellings_are_normalised_by_from_dict_and_refused_when_code_passes_them_directly():
    from liquid_diffusion.config import DataConfig

    assert DataConfig.from_dict({"flip": "on"}).flip is True
    assert ModelConfig.from_dict({"kernels": 5}).kernels == (5,)
    with pytest.raises(ConfigError, match=r"flip='on' is not valid here; pass True"):
        DataConfig(flip="on")
    with pytest.raises(ConfigError, match=r"kernels=\[3\] is not valid here; pass \(3,\)"):
        ModelConfig(kernels=[3])
    with pytest.raises(ConfigError, match="mixer='attention' is not valid; choose one of: cfc, conv"):
        ModelConfig(mixer="attention")


def test_the_model_input_follows_the_data_and_a_mismatch_is_refused():
    cfg = ExperimentConfig().with_overrides({"data.codec": "sd-vae", "data.channels": 3, "data.resolution": 64})
    assert (cfg.model.in_channels, cfg.model.resolution) == (4, 8)
    with pytest.raises(ConfigError, match="model input 4x32 does not match the data's 1x32"):
        ExperimentConfig(model=ModelConfig())
