"""The settings of kohya users' configs (issue 12): network_module/network_args, switches, optimizer names,
optimizer_args, validation prompt tables, and the cache combinations that are refused."""

from __future__ import annotations

import pytest

from loha_diffusion.errors import ConfigError
from loha_diffusion.training import config as config_module
from loha_diffusion.training.config import (
    kohya_network_settings,
    load_config,
    parse_optimizer_args,
    read_toml,
)

REQUIRED = ["--pretrained_model_name_or_path", "model", "--train_data_dir", "data", "--max_train_steps", "10"]


def write_toml(tmp_path, text: str):
    path = tmp_path / "train.toml"
    path.write_text(text)
    return path


def test_lycoris_network_args_in_a_kohya_toml(tmp_path):
    path = write_toml(
        tmp_path,
        'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nmax_train_steps = 5\n'
        'network_module = "lycoris.kohya"\n'
        'network_args = ["algo=loha", "conv_dim=4", "conv_alpha=2", "use_tucker=True", "rank_dropout=0.1",'
        ' "module_dropout=0.05"]\nnetwork_dim = 8\n',
    )
    cfg = load_config(["--config", str(path)])
    assert (cfg.algo, cfg.rank, cfg.conv_rank, cfg.conv_alpha) == ("loha", 8, 4, 2.0)
    assert cfg.preset == "full"  # kohya adapts the 3x3 convs once conv_dim is given
    assert cfg.use_effective_conv2d and (cfg.rank_dropout, cfg.module_dropout) == (0.1, 0.05)


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("networks.lora", [], {"algo": "lora"}),
        ("lycoris.kohya", [], {"algo": "lora"}),  # LyCORIS's default algo is LoRA/LoCon
        ("lycoris.kohya", ["algo=locon", "preset=attn-mlp"], {"algo": "lora", "preset": "attn_ff"}),
        (None, ["use_cp=false"], {"use_effective_conv2d": False}),
    ],
)
def test_kohya_network_settings(module, args, expected):
    assert kohya_network_settings(module, args) == expected


@pytest.mark.parametrize(
    ("module", "args", "words"),
    [
        ("networks.dylora", [], ["networks.dylora", "lycoris.kohya"]),
        ("lycoris.kohya", ["algo=lokr"], ["algo=lokr", "algo=loha"]),
        ("lycoris.kohya", ["dropout=0.1"], ["dropout=0.1", "rank_dropout"]),
        ("lycoris.kohya", ["block_dims=2,2,2"], ["block_dims", "rank_pattern"]),
        ("lycoris.kohya", ["train_norm=True"], ["train_norm", "known:"]),
        ("lycoris.kohya", ["conv_dim"], ["not key=value"]),
        ("lycoris.kohya", ["conv_dim=four"], ["not a number"]),
    ],
)
def test_kohya_network_settings_refused_with_the_equivalent(module, args, words):
    with pytest.raises(ConfigError) as info:
        kohya_network_settings(module, args)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_network_args_on_the_command_line_and_conflicts():
    cfg = load_config(
        REQUIRED + ["--network_module", "lycoris.kohya", "--network_args", "algo=loha", "conv_dim=2"]
    )
    assert (cfg.algo, cfg.conv_rank) == ("loha", 2)
    with pytest.raises(ConfigError, match="conv_rank"):
        load_config(REQUIRED + ["--network_args", "conv_dim=2", "--conv_dim", "4"])


def test_network_args_and_the_same_setting_in_a_toml_are_refused(tmp_path):
    path = write_toml(tmp_path, 'network_args = ["conv_dim=4"]\nconv_dim = 8\n')
    with pytest.raises(ConfigError, match="both set conv_rank"):
        read_toml(path)


def test_switches_and_optimizer_names(monkeypatch):
    monkeypatch.setattr(config_module, "_installed", lambda module: True)
    cfg = load_config(REQUIRED + ["--use_8bit_adam", "--random_crop"])
    assert cfg.optimizer_type == "AdamW8bit" and cfg.center_crop is False
    for written in ("prodigy", "PRODIGY", "Prodigy"):
        assert load_config(REQUIRED + ["--optimizer_type", written]).optimizer_type == "Prodigy"
    with pytest.raises(ConfigError, match="optimizer_type"):
        load_config(REQUIRED + ["--optimizer_type", "SGD"])


def test_missing_optimizer_package_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setattr(config_module, "_installed", lambda module: module not in ("lion_pytorch",))
    with pytest.raises(ConfigError, match="pip install lion-pytorch"):
        load_config(REQUIRED + ["--optimizer_type", "lion"])


def test_optimizer_args_are_kohya_literals():
    assert parse_optimizer_args(
        ["weight_decay=0.1", "betas=0.9,0.99", "relative_step=False", "d_coef=2"]
    ) == {
        "weight_decay": 0.1,
        "betas": (0.9, 0.99),
        "relative_step": False,
        "d_coef": 2,
    }
    assert parse_optimizer_args(["decouple=True", "name=foo"]) == {"decouple": True, "name": "foo"}
    for bad, words in ((["betas"], "key=value"), (["a=1", "a=2"], "twice"), (["1x=2"], "key=value")):
        with pytest.raises(ConfigError, match=words):
            parse_optimizer_args(bad)


def test_center_crop_default_follows_kohya_with_buckets_and_caches():
    assert load_config(REQUIRED).center_crop is False  # diffusers: random crop
    assert load_config(REQUIRED + ["--enable_bucket"]).center_crop is True  # kohya: centre unless random_crop
    assert load_config(REQUIRED + ["--cache_latents_to_disk"]).cache_latents is True
    assert load_config(REQUIRED + ["--enable_bucket", "--random_crop"]).center_crop is False


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (
            ["--cache_latents", "--center_crop", "false"],
            ["cache_latents", "random crop", "center_crop = true"],
        ),
        (["--cache_latents", "--random_crop"], ["cache_latents", "random_crop"]),
        (
            ["--cache_text_encoder_outputs", "--train_text_encoder"],
            ["cache_text_encoder_outputs", "train_text_encoder"],
        ),
        (["--cache_text_encoder_outputs_to_disk", "--shuffle_caption"], ["shuffle_caption"]),
        (["--cache_text_encoder_outputs", "--caption_tag_dropout_rate", "0.1"], ["caption_tag_dropout_rate"]),
        (["--bucket_reso_steps", "60"], ["bucket_reso_steps", "divisible by 8"]),
        (["--caption_separator", ""], ["caption_separator"]),
        (["--max_token_length", "100"], ["max_token_length"]),
        (["--clip_skip", "0"], ["clip_skip"]),
        (["--prior_loss_weight", "-1"], ["prior_loss_weight"]),
    ],
)
def test_incompatible_or_bad_settings_are_refused_by_name(flags, words):
    with pytest.raises(ConfigError) as info:
        load_config(REQUIRED + flags)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_validation_prompt_tables_round_trip(tmp_path):
    path = write_toml(
        tmp_path,
        'pretrained_model_name_or_path = "m"\ntrain_data_dir = "d"\nmax_train_steps = 5\n'
        "sample_every_n_epochs = 2\n"
        '[[validation_prompts]]\nprompt = "a cat"\nnegative_prompt = "blurry"\nseed = 7\nwidth = 512\n'
        'height = 768\nguidance_scale = 5\n[[validation_prompts]]\nprompt = "a dog"\nnum_inference_steps = 20\n',
    )
    cfg = load_config(["--config", str(path)])
    assert cfg.validation_epochs == 2
    assert cfg.validation_prompts == [
        {
            "prompt": "a cat",
            "negative_prompt": "blurry",
            "seed": 7,
            "width": 512,
            "height": 768,
            "guidance_scale": 5,
        },
        {"prompt": "a dog", "num_inference_steps": 20},
    ]
    saved = tmp_path / "saved.toml"
    saved.write_text(cfg.to_toml())
    assert load_config(["--config", str(saved)]) == cfg
    flags = REQUIRED + ["--validation_prompts", '{"prompt": "a cat", "seed": 1}', '{"prompt": "a dog"}']
    assert [t["prompt"] for t in load_config(flags).validation_prompts] == ["a cat", "a dog"]


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('prompt = ""', ["table 1", "no prompt"]),
        ('prompt = "a"\nsed = 1', ["sed", "did you mean 'seed'"]),
        ('prompt = "a"\nwidth = 500', ["width", "multiple of 8"]),
        ('prompt = "a"\nseed = "one"', ["seed", "int"]),
        ('prompt = "a"\nnum_images = 0', ["num_images", ">= 1"]),
        ('prompt = "a"\nguidance_scale = -1.0', ["guidance_scale"]),
    ],
)
def test_bad_validation_prompt_tables_name_the_table_and_key(tmp_path, table, words):
    path = write_toml(tmp_path, f"[[validation_prompts]]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(REQUIRED + ["--config", str(path)])
    assert all(word in str(info.value) for word in words), str(info.value)


def test_kohya_lr_scheduler_aliases():
    cfg = load_config(
        REQUIRED + ["--lr_scheduler_num_cycles", "3", "--lr_scheduler_power", "2", "--unet_lr", "2e-4"]
    )
    assert (cfg.lr_num_cycles, cfg.lr_power, cfg.effective_unet_lr, cfg.learning_rate) == (3, 2.0, 2e-4, 1e-4)


def test_every_setting_has_help_and_kohya_aliases_show_in_help(capsys):
    with pytest.raises(SystemExit):
        load_config(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--enable_bucket",
        "--cache_latents_to_disk",
        "--shuffle_caption",
        "--keep_tokens_separator",
        "--reg_data_dir",
        "--prior_loss_weight",
        "--max_token_length",
        "--clip_skip",
        "--optimizer_type",
        "--optimizer_args",
        "--network_module",
        "--network_args",
        "--random_crop",
        "--sample_every_n_epochs",
        "--lr_scheduler_num_cycles",
        "--flip_aug",
    ):
        assert flag in text, flag


def test_the_readme_documents_every_setting_and_alias():
    import dataclasses
    from pathlib import Path

    from loha_diffusion.training.config import KOHYA_SWITCHES, TrainConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    names += [alias for f in dataclasses.fields(TrainConfig) for alias in f.metadata.get("aliases", ())]
    names += [*KOHYA_SWITCHES, "network_module", "network_args"]
    assert [name for name in names if f"`{name}`" not in readme] == []
