"""Long prompts and clip skip as kohya sd-scripts encodes them (`conditioning.TextEncoding`): the token windows
of 75, how their states are joined, the pooled SDXL embedding, clip skip's hidden state with the final layer
norm, the refusal of clip skip for SDXL, and the pipeline keyword arguments validation uses."""

from __future__ import annotations

import pytest
import torch
from test_training_loop import base_flags, make_dataset

from loha_diffusion import tiny
from loha_diffusion.errors import ConfigError
from loha_diffusion.training import loop
from loha_diffusion.training.conditioning import (
    TextEncoding,
    check_text_encoding,
    chunked_token_ids,
    encode_prompts,
    join_windows,
    pipeline_prompt_embeds,
    tokenize,
    unet_conditioning,
)
from loha_diffusion.training.config import TrainConfig, load_config
from loha_diffusion.training.models import Models

CAPTIONS = ["a red car", "a photo of a dog on the beach at sunset"]
WORDS = tiny.TINY_WORDS
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(150))  # 150 words, one token each in the tiny vocab


def small_tokenizer(pad: str | None = None):
    """The tiny CLIP tokenizer with windows of 7 ids (5 tokens) so kohya's windows can be written by hand;
    `pad` "!" makes it an SD2/SDXL-te2 style tokenizer (padding is not EOS)."""
    tokenizer = tiny.build_tiny_tokenizer()
    tokenizer.model_max_length = 7
    if pad is not None:
        tokenizer.pad_token = pad
    return tokenizer


def word_ids(tokenizer, words: str) -> list[int]:
    return tokenizer(words, add_special_tokens=False).input_ids


def test_the_tiny_words_are_one_token_each():
    tokenizer = tiny.build_tiny_tokenizer()
    assert len(word_ids(tokenizer, LONG)) == 150


# -- kohya's windows, by hand ---------------------------------------------------------------------------------


def test_windows_when_padding_is_eos_sd1():
    """SD1 (padding = EOS): each window is BOS, 5 ids of the padded sequence, the sequence's last id."""
    tok = small_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    w = word_ids(tok, "a b c d e f g")
    ids = chunked_token_ids(tok, ["a b c d e f g"], TextEncoding(max_token_length=10))
    assert ids.shape == (1, 2, 7) and ids.dtype == torch.int64
    assert ids[0].tolist() == [
        [bos, *w[0:5], eos],
        [bos, w[5], w[6], eos, eos, eos, eos],
    ]


def test_windows_when_padding_is_not_eos_sd2_sdxl():
    """SD2/SDXL te2 (padding "!"): a window ending in a word ends in EOS; one starting with padding starts
    BOS EOS (kohya's `_get_input_ids`, "v2 or SDXL")."""
    tok = small_tokenizer(pad="!")
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert pad != eos
    w = word_ids(tok, "a b c d e f g")
    ids = chunked_token_ids(tok, ["a b c d e f g", "a b c d"], TextEncoding(max_token_length=10))
    assert ids[0].tolist() == [
        [bos, *w[0:5], eos],  # the sequence's last id is PAD: replaced, the window ends in a word
        [bos, w[5], w[6], eos, pad, pad, pad],
    ]
    assert ids[1].tolist() == [
        [bos, *w[0:4], eos, pad],  # ends "EOS PAD": kept
        [bos, eos, pad, pad, pad, pad, pad],  # empty window: BOS EOS PAD ...
    ]


def test_a_caption_longer_than_the_windows_is_cut_as_kohya():
    """Truncated to max_token_length tokens; the last window ends with the sequence's EOS."""
    tok = small_tokenizer()
    w = word_ids(tok, "a b c d e f g h i j k l")
    ids = chunked_token_ids(tok, ["a b c d e f g h i j k l"], TextEncoding(max_token_length=10))
    assert ids[0].tolist() == [
        [tok.bos_token_id, *w[0:5], tok.eos_token_id],
        [tok.bos_token_id, *w[5:10], tok.eos_token_id],
    ]


def test_one_window_is_the_plain_tokenization():
    tok = tiny.build_tiny_tokenizer()
    for encoding in (TextEncoding(), TextEncoding(max_token_length=75)):
        assert encoding.windows(tok) == 1
        assert torch.equal(chunked_token_ids(tok, CAPTIONS, encoding)[:, 0], tokenize(tok, CAPTIONS, "cpu"))
    assert TextEncoding(max_token_length=150).windows(tok) == 2
    assert TextEncoding(max_token_length=225).windows(tok) == 3


def test_join_windows_keeps_first_bos_inner_states_and_last_state():
    """Positions 0..13 of two windows of 7: BOS of the first (0), the inner 1-5 and 8-12, the last (13)."""
    states = torch.arange(2 * 14, dtype=torch.float32).reshape(2 * 2, 7, 1)  # 2 captions x 2 windows
    joined = join_windows(states, 2)
    assert joined.shape == (2, 12, 1)
    assert joined[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert joined[1, :, 0].tolist() == [14 + p for p in [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]]
    assert join_windows(states, 1) is states
    with pytest.raises(ValueError, match="multiple of 3"):
        join_windows(states, 3)


# -- through the text encoders --------------------------------------------------------------------------------


class Recorder:
    """Records the input ids every forward of a text encoder gets."""

    def __init__(self, module):
        self.ids: list[torch.Tensor] = []
        module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.ids.append((args[0] if args else kwargs["input_ids"]).clone())


@torch.no_grad()
def test_a_150_token_caption_reaches_the_text_encoder_whole(tiny_sd1_pipeline):
    pipe = tiny_sd1_pipeline
    recorder = Recorder(pipe.text_encoder)
    states, pooled = encode_prompts(
        [pipe.tokenizer],
        [pipe.text_encoder],
        [LONG],
        device="cpu",
        encoding=TextEncoding(max_token_length=150),
    )
    assert pooled is None and states.shape == (1, 152, pipe.text_encoder.config.hidden_size)
    (fed,) = recorder.ids
    assert fed.shape == (2, 77)  # two windows, one forward
    special = {pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id}
    words = [i for i in fed.flatten().tolist() if i not in special]
    assert words == word_ids(pipe.tokenizer, LONG)
    # Without max_token_length the caption is cut at 75 tokens, as before.
    recorder.ids.clear()
    short, _ = encode_prompts([pipe.tokenizer], [pipe.text_encoder], [LONG], device="cpu")
    assert short.shape[1] == 77 and recorder.ids[0].shape == (1, 77)


@torch.no_grad()
def test_long_states_are_the_windows_states_joined(tiny_sd1_pipeline):
    """Each window encoded on its own (CLIP's causal attention sees only its window), then joined."""
    pipe = tiny_sd1_pipeline
    encoding = TextEncoding(max_token_length=225)
    states, _ = encode_prompts(
        [pipe.tokenizer], [pipe.text_encoder], [LONG, "a cat"], device="cpu", encoding=encoding
    )
    assert states.shape[1] == 227
    ids = chunked_token_ids(pipe.tokenizer, [LONG, "a cat"], encoding)
    for b in range(2):
        windows = [pipe.text_encoder(ids[b, k : k + 1])[0][0] for k in range(3)]
        expected = torch.cat([windows[0][:1], *[w[1:76] for w in windows], windows[2][76:]])
        torch.testing.assert_close(states[b], expected)


@torch.no_grad()
def test_clip_skip_is_the_earlier_hidden_state_with_the_final_layer_norm(tiny_sd1_pipeline):
    pipe = tiny_sd1_pipeline
    te = pipe.text_encoder
    ids = tokenize(pipe.tokenizer, CAPTIONS, "cpu")
    hidden = te(ids, output_hidden_states=True).hidden_states
    skipped, _ = encode_prompts(
        [pipe.tokenizer], [te], CAPTIONS, device="cpu", encoding=TextEncoding(clip_skip=2)
    )
    assert torch.equal(skipped, te.final_layer_norm(hidden[-2]))
    default, _ = encode_prompts([pipe.tokenizer], [te], CAPTIONS, device="cpu")
    assert not torch.allclose(skipped, default)
    # clip_skip 1 is the last hidden state, exactly the default.
    last, _ = encode_prompts(
        [pipe.tokenizer], [te], CAPTIONS, device="cpu", encoding=TextEncoding(clip_skip=1)
    )
    assert torch.equal(last, default) and torch.equal(default, te(ids)[0])
    long, _ = encode_prompts(
        [pipe.tokenizer], [te], [LONG], device="cpu", encoding=TextEncoding(max_token_length=150, clip_skip=2)
    )
    assert long.shape[1] == 152
    with pytest.raises(ConfigError, match="clip_skip = 9 but the text encoder has only 2 layers"):
        encode_prompts([pipe.tokenizer], [te], CAPTIONS, device="cpu", encoding=TextEncoding(clip_skip=9))


def test_gradients_flow_through_long_prompts_and_clip_skip(tiny_sd1_pipeline):
    """Trained text-encoder adapters get gradients through the windows and the skipped layers."""
    te = tiny_sd1_pipeline.text_encoder
    states, _ = encode_prompts(
        [tiny_sd1_pipeline.tokenizer],
        [te],
        [LONG],
        device="cpu",
        encoding=TextEncoding(max_token_length=150, clip_skip=2),
    )
    states.square().mean().backward()
    assert te.final_layer_norm.weight.grad is not None
    assert te.embeddings.token_embedding.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_sdxl_long_prompt_states_and_the_first_windows_pooled_embedding(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    models = Models.from_pipeline(pipe)
    encoding = TextEncoding(max_token_length=150)
    states, added = unet_conditioning(
        models, [LONG, "a cat"], device="cpu", target_size=(32, 32), encoding=encoding
    )
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert states.shape == (2, 152, width)
    ids2 = chunked_token_ids(pipe.tokenizer_2, [LONG, "a cat"], encoding)
    first = pipe.text_encoder_2(ids2[:, 0])[0]  # text_embeds of each caption's first window
    torch.testing.assert_close(added["text_embeds"], first)
    assert added["time_ids"].shape == (2, 6)
    out = pipe.unet(torch.randn(2, 4, 4, 4), torch.tensor([1, 2]), states, added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 4, 4)


def test_clip_skip_is_refused_for_sdxl_before_loading(tiny_sdxl_pipeline):
    cfg = TrainConfig(pretrained_model_name_or_path="x", train_data_dir="y", clip_skip=2)
    with pytest.raises(ConfigError, match="clip_skip = 2 cannot be used with an SDXL base model"):
        check_text_encoding(cfg, "sdxl")
    assert check_text_encoding(cfg, "sd1") == TextEncoding(clip_skip=2)
    cfg.max_token_length = 225
    assert check_text_encoding(cfg, "sd2") == TextEncoding(max_token_length=225, clip_skip=2)
    with pytest.raises(ConfigError, match="clip_skip"):
        unet_conditioning(
            Models.from_pipeline(tiny_sdxl_pipeline),
            CAPTIONS,
            device="cpu",
            target_size=(32, 32),
            encoding=TextEncoding(2 * 75, 2),
        )


def test_encoding_key_normalises_equivalent_settings():
    assert TextEncoding().key() == TextEncoding(75, 1).key() == {"max_token_length": None, "clip_skip": None}
    assert TextEncoding(150, 2).key() == {"max_token_length": 150, "clip_skip": 2}
    cfg = TrainConfig(pretrained_model_name_or_path="x", train_data_dir="y", max_token_length=150)
    assert TextEncoding.from_config(cfg) == TextEncoding(max_token_length=150)


# -- validation's pipeline arguments ---------------------------------------------------------------------------


@torch.no_grad()
def test_pipeline_prompt_embeds_default_equals_the_pipelines_own_sd1(tiny_sd1_pipeline):
    pipe = tiny_sd1_pipeline
    kwargs = pipeline_prompt_embeds(Models.from_pipeline(pipe), CAPTIONS, ["blurry", ""], device="cpu")
    assert set(kwargs) == {"prompt_embeds", "negative_prompt_embeds"}
    positive, negative = pipe.encode_prompt(CAPTIONS, "cpu", 1, True, negative_prompt=["blurry", ""])
    assert torch.equal(kwargs["prompt_embeds"], positive) and torch.equal(
        kwargs["negative_prompt_embeds"], negative
    )
    with pytest.raises(ValueError, match="2 prompts but 1 negative"):
        pipeline_prompt_embeds(Models.from_pipeline(pipe), CAPTIONS, [""], device="cpu")


@torch.no_grad()
def test_pipeline_prompt_embeds_default_equals_the_pipelines_own_sdxl(tiny_sdxl_pipeline):
    pipe = tiny_sdxl_pipeline
    kwargs = pipeline_prompt_embeds(
        Models.from_pipeline(pipe), CAPTIONS, ["blurry", "low quality"], device="cpu"
    )
    expected = pipe.encode_prompt(
        CAPTIONS,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=["blurry", "low quality"],
    )
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    for name, value in zip(names, expected):
        assert torch.equal(kwargs[name], value), name
    # The SDXL base pipeline's zeros for a prompt without negative.
    zeros = pipeline_prompt_embeds(
        Models.from_pipeline(pipe), CAPTIONS, ["blurry", ""], device="cpu", force_zeros_for_empty_prompt=True
    )
    assert torch.equal(zeros["negative_prompt_embeds"][0], kwargs["negative_prompt_embeds"][0])
    assert (
        not zeros["negative_prompt_embeds"][1].any() and not zeros["negative_pooled_prompt_embeds"][1].any()
    )


@torch.no_grad()
def test_long_prompt_embeds_drive_the_pipeline(tiny_sd1_pipeline):
    """Positive and negative of the same length (152), accepted by the diffusers pipeline."""
    pipe = tiny_sd1_pipeline
    kwargs = pipeline_prompt_embeds(
        Models.from_pipeline(pipe),
        [LONG],
        ["blurry"],
        device="cpu",
        encoding=TextEncoding(max_token_length=150, clip_skip=2),
    )
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (1, 152, 32)
    image = pipe(
        **kwargs,
        num_inference_steps=1,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_train_refuses_clip_skip_for_sdxl_before_loading_weights(
    monkeypatch, tiny_sdxl_pipeline_dir, tmp_path
):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(loop, "load_models", no_loading)
    data = make_dataset(tmp_path / "data", 2)
    cfg = load_config(
        base_flags(tiny_sdxl_pipeline_dir, data, tmp_path / "out", clip_skip="2", max_train_steps="1")
    )
    with pytest.raises(ConfigError, match="clip_skip = 2 cannot be used with an SDXL base model"):
        loop.train(cfg)


def test_dry_run_refuses_clip_skip_for_sdxl(tiny_sdxl_pipeline_dir, tmp_path):
    from loha_diffusion.training.plan import dry_run

    data = make_dataset(tmp_path / "data", 2)
    cfg = load_config(
        base_flags(tiny_sdxl_pipeline_dir, data, tmp_path / "out", clip_skip="2", max_train_steps="1")
    )
    with pytest.raises(ConfigError, match="clip_skip = 2 cannot be used with an SDXL base model"):
        dry_run(cfg, num_processes=1)
