"""Layer names parsed into (index, component), alone and across the stacks of a whole model."""

from __future__ import annotations

import pytest

from gradspectra.capture import parse_layer_name, parse_layer_names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # decoder-only LLMs
        ("model.layers.12.self_attn.q_proj.weight", (12, "self_attn.q_proj")),
        ("model.layers.12.self_attn.q_proj", (12, "self_attn.q_proj")),
        ("model.layers.0.mlp.down_proj.bias", (0, "mlp.down_proj")),
        (
            "base_model.model.model.layers.3.self_attn.v_proj.lora_A.default.weight",
            (3, "self_attn.v_proj.lora_A.default"),
        ),
        ("model.decoder.layers.4.self_attn.k_proj.weight", (4, "self_attn.k_proj")),  # OPT
        # encoders
        ("bert.encoder.layer.3.attention.self.query", (3, "attention.self.query")),
        ("bert.encoder.layer.11.output.dense.weight", (11, "output.dense")),
        # GPT-2
        ("transformer.h.5.attn.c_attn", (5, "attn.c_attn")),
        ("transformer.h.5.mlp.c_proj.weight", (5, "mlp.c_proj")),
        # T5: the block, not the sub-layer, is the layer
        ("encoder.block.2.layer.0.SelfAttention.q.weight", (2, "layer.0.SelfAttention.q")),
        ("decoder.block.2.layer.1.EncDecAttention.o.weight", (2, "layer.1.EncDecAttention.o")),
        # vision
        ("features.3.0.conv", (3, "0.conv")),
        ("features.3.weight", (3, "features")),
        ("layer1.0.conv1.weight", (0, "conv1")),
        ("vit.encoder.layer.7.attention.attention.query.weight", (7, "attention.attention.query")),
        ("visual.transformer.resblocks.0.attn.out_proj.weight", (0, "attn.out_proj")),
        # torch.nn.TransformerEncoder
        ("layers.1.self_attn.out_proj.weight", (1, "self_attn.out_proj")),
        ("layers.1.linear1", (1, "linear1")),
        # top-level nn.Sequential children
        ("0.attn.q.weight", (0, "attn.q")),
        ("0.weight", (None, "0")),
        ("0", (None, "0")),
        # wrappers (torch.compile, FSDP1, activation checkpointing) do not change the component
        ("_orig_mod.model.layers.2.self_attn.q_proj.weight", (2, "self_attn.q_proj")),
        (
            "_fsdp_wrapped_module.model.layers.2._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight",
            (2, "mlp.up_proj"),
        ),
        ("_orig_mod.lm_head.weight", (None, "lm_head")),
        # no index
        ("classifier", (None, "classifier")),
        ("lm_head.weight", (None, "lm_head")),
        ("bert.pooler.dense.weight", (None, "bert.pooler.dense")),
        ("weight", (None, "weight")),
        ("model.pos_embedding", (None, "model.pos_embedding")),
    ],
)
def test_parse_layer_name(name: str, expected: tuple[int | None, str]) -> None:
    assert parse_layer_name(name) == expected


def test_parse_layer_name_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="`name` must be a str, got 3"):
        parse_layer_name(3)  # type: ignore[arg-type]


def test_single_stack_is_left_as_parsed() -> None:
    names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(3) for p in "qkvo"] + ["lm_head.weight"]
    assert parse_layer_names(names) == {n: parse_layer_name(n) for n in names}


def test_bert_encoder_is_not_prefixed() -> None:
    # "encoder" alone is not an encoder-decoder model: nothing collides
    names = ["bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.attention.self.query.weight"]
    assert parse_layer_names(names)[names[1]] == (1, "attention.self.query")


def test_encoder_and_decoder_stacks_are_qualified() -> None:
    names = [
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi.weight",
        "decoder.block.0.layer.0.SelfAttention.q.weight",
        "decoder.block.0.layer.1.EncDecAttention.q.weight",
        "lm_head.weight",
    ]
    parsed = parse_layer_names(names)
    assert parsed == {
        names[0]: (0, "encoder.layer.0.SelfAttention.q"),
        # qualified even though it collides with nothing: a whole stack is named one way
        names[1]: (1, "encoder.layer.1.DenseReluDense.wi"),
        names[2]: (0, "decoder.layer.0.SelfAttention.q"),
        names[3]: (0, "decoder.layer.1.EncDecAttention.q"),
        names[4]: (None, "lm_head"),
    }


def test_bart_style_stacks_drop_shared_segments() -> None:
    names = ["model.encoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.self_attn.q_proj.weight"]
    assert [parse_layer_names(names)[n] for n in names] == [
        (0, "encoder.self_attn.q_proj"),
        (0, "decoder.self_attn.q_proj"),
    ]


def test_multimodal_towers_are_qualified() -> None:
    names = [
        "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
    ]
    assert [parse_layer_names(names)[n][1] for n in names] == [
        "vision_tower.vision_model.encoder.self_attn.q_proj",
        "language_model.self_attn.q_proj",
    ]


def test_resnet_stages_are_qualified() -> None:
    names = [f"layer{s}.{b}.conv1.weight" for s in (1, 2) for b in (0, 1)]
    parsed = parse_layer_names(names)
    assert parsed["layer1.1.conv1.weight"] == (1, "layer1.conv1")
    assert parsed["layer2.0.conv1.weight"] == (0, "layer2.conv1")


def test_full_stack_path_when_trimming_leaves_nothing() -> None:
    names = ["model.layers.0.attn.q.weight", "model.extra.layers.0.attn.q.weight"]
    assert [parse_layer_names(names)[n][1] for n in names] == ["model.layers.attn.q", "model.extra.layers.attn.q"]


def test_parse_layer_names_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="`names` must hold str, got None"):
        parse_layer_names(["a.weight", None])  # type: ignore[list-item]
