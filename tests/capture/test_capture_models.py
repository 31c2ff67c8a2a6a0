"""Selection and gradient reading on tiny real transformers models (Llama, Qwen2, BERT, GPT-2, T5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from gradspectra.capture import WatchedParameter, group_by_component, select_parameters  # noqa: E402

TOKENS = torch.tensor([[1, 5, 7, 9, 2, 3], [4, 4, 8, 6, 1, 0]])


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def qwen2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=True,
    )
    return transformers.Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=64,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def make_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return make_gpt2()


@pytest.fixture(scope="module")
def t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    return transformers.T5ForConditionalGeneration(config)


def linear_weight_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))}


def by_name(watched: list[WatchedParameter]) -> dict[str, WatchedParameter]:
    return {w.name: w for w in watched}


@pytest.mark.parametrize("fixture", ["llama", "qwen2", "bert", "gpt2", "t5"])
def test_default_selection_is_every_linear_weight(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    selection = select_parameters(model)
    ids = [id(w.param) for w in selection.watched]
    assert len(ids) == len(set(ids)), "a parameter is watched twice"
    assert set(ids) == linear_weight_ids(model)
    assert selection.frozen == []
    keys = [w.key for w in selection.watched]
    assert len(keys) == len(set(keys)), "two watched parameters share a key"
    params = dict(model.named_parameters(remove_duplicate=False))
    for w in selection.watched:
        assert params[w.name] is w.param
        assert w.module_path + ".weight" == w.name
        assert w.module is not None and w.module.weight is w.param


@pytest.mark.parametrize("fixture", ["llama", "qwen2"])
def test_llama_family_names(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    watched = by_name(select_parameters(model).watched)
    q = watched["model.layers.1.self_attn.q_proj.weight"]
    assert (q.index, q.component, q.key) == (1, "self_attn.q_proj", "self_attn.q_proj/layer_01")
    assert q.module_path == "model.layers.1.self_attn.q_proj"
    down = watched["model.layers.0.mlp.down_proj.weight"]
    assert (down.index, down.component) == (0, "mlp.down_proj")
    assert (watched["lm_head.weight"].index, watched["lm_head.weight"].key) == (None, "lm_head")


def test_llama_embeddings_excluded_then_included(llama: nn.Module) -> None:
    assert select_parameters(llama).excluded == ["model.embed_tokens.weight"]
    selection = select_parameters(llama, include_embeddings=True)
    assert selection.excluded == []
    embed = selection.watched[0]
    assert (embed.name, embed.index, embed.key) == ("model.embed_tokens.weight", None, "model.embed_tokens")


def test_tied_qwen2_head_is_watched_once_as_lm_head(qwen2: nn.Module) -> None:
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight
    for include_embeddings in (False, True):
        selection = select_parameters(qwen2, include_embeddings=include_embeddings)
        tied = [w for w in selection.watched if w.param is qwen2.lm_head.weight]
        assert [w.name for w in tied] == ["lm_head.weight"]
        assert selection.excluded == []


def test_bert_names_and_embeddings(bert: nn.Module) -> None:
    selection = select_parameters(bert)
    watched = by_name(selection.watched)
    q = watched["bert.encoder.layer.1.attention.self.query.weight"]
    assert (q.index, q.component) == (1, "attention.self.query")
    assert (watched["bert.encoder.layer.0.output.dense.weight"].component) == "output.dense"
    assert watched["bert.pooler.dense.weight"].key == "bert.pooler.dense"
    assert watched["classifier.weight"].key == "classifier"
    assert selection.excluded == [
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    ]
    with_embeddings = select_parameters(bert, include_embeddings=True)
    assert {w.name for w in with_embeddings.watched} - set(watched) == set(selection.excluded)


def test_gpt2_conv1d_and_tied_head(gpt2: nn.Module) -> None:
    selection = select_parameters(gpt2)
    names = [w.name for w in selection.watched]
    assert names == [
        f"transformer.h.{i}.{c}.weight"
        for i in (0, 1)
        for c in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ] + ["lm_head.weight"]
    # wte is tied to lm_head: watched (as lm_head), so not reported as excluded
    assert selection.excluded == ["transformer.wpe.weight"]
    with_embeddings = select_parameters(gpt2, include_embeddings=True)
    tied = [w for w in with_embeddings.watched if w.param is gpt2.transformer.wte.weight]
    assert [w.name for w in tied] == ["lm_head.weight"]
    assert with_embeddings.watched[0].name == "transformer.wpe.weight"


def test_gpt2_grad_matrix_is_out_by_in_view_after_backward() -> None:
    model = make_gpt2()
    watched = by_name(select_parameters(model).watched)
    c_attn = watched["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.grad_matrix() is None
    model(input_ids=TOKENS, labels=TOKENS).loss.backward()
    g = c_attn.grad_matrix()
    assert g is not None
    assert tuple(c_attn.param.shape) == (32, 96)  # Conv1D stores in x out
    assert tuple(g.shape) == (96, 32)  # out x in
    assert torch.equal(g, c_attn.param.grad.T)
    assert g.data_ptr() == c_attn.param.grad.data_ptr(), "grad_matrix copied the gradient"
    head = watched["lm_head.weight"].grad_matrix()
    assert head is not None and tuple(head.shape) == (100, 32)


def test_t5_encoder_and_decoder_keys_do_not_collide(t5: nn.Module) -> None:
    selection = select_parameters(t5)
    watched = by_name(selection.watched)
    enc = watched["encoder.block.1.layer.0.SelfAttention.q.weight"]
    dec = watched["decoder.block.1.layer.0.SelfAttention.q.weight"]
    assert (enc.index, enc.component) == (1, "encoder.layer.0.SelfAttention.q")
    assert (dec.index, dec.component) == (1, "decoder.layer.0.SelfAttention.q")
    assert dec.key == "decoder.layer.0.SelfAttention.q/layer_01"
    cross = watched["decoder.block.0.layer.1.EncDecAttention.k.weight"]
    assert cross.key == "decoder.layer.1.EncDecAttention.k/layer_00"
    groups = group_by_component(selection.watched)
    assert [w.index for w in groups["encoder.layer.0.SelfAttention.q"]] == [0, 1]
    assert [w.index for w in groups["decoder.layer.0.SelfAttention.q"]] == [0, 1]
    assert groups["lm_head"][0].index is None
    # relative position biases are embeddings
    assert all(n.endswith("relative_attention_bias.weight") for n in selection.excluded)


def test_group_by_component_sorts_layers(qwen2: nn.Module) -> None:
    watched = select_parameters(qwen2).watched
    groups = group_by_component(reversed(watched))
    assert next(iter(groups)) == "lm_head"
    assert [w.index for w in groups["self_attn.o_proj"]] == [0, 1, 2]
    assert sum(len(g) for g in groups.values()) == len(watched)


def test_frozen_parameters_are_listed_not_watched() -> None:
    model = make_gpt2()
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    model.transformer.wpe.weight.requires_grad_(False)
    selection = select_parameters(model)
    frozen = [f"transformer.h.0.{c}.weight" for c in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert selection.frozen == ["transformer.wpe.weight", *frozen]
    assert selection.excluded == []
    assert all(w.param.requires_grad for w in selection.watched)
    assert [w.index for w in selection.watched] == [1, 1, 1, 1, None]


def test_include_exclude_regex_predicate(llama: nn.Module) -> None:
    attn = select_parameters(llama, include="*.self_attn.*_proj.weight").watched
    assert [w.key for w in attn[:4]] == [f"self_attn.{p}_proj/layer_00" for p in "qkvo"]
    assert len(attn) == 8
    two_globs = select_parameters(llama, include=["*.q_proj.weight", "*.v_proj.weight"])
    assert {w.component for w in two_globs.watched} == {"self_attn.q_proj", "self_attn.v_proj"}
    no_o = select_parameters(llama, include="*.self_attn.*", exclude=["*o_proj*", "*.k_proj.*"])
    assert {w.component for w in no_o.watched} == {"self_attn.q_proj", "self_attn.v_proj"}
    by_regex = select_parameters(llama, regex=r"layers\.1\..*mlp")
    assert [w.key for w in by_regex.watched] == [f"mlp.{p}_proj/layer_01" for p in ("gate", "up", "down")]

    seen: list[tuple[str, tuple[int, ...], str]] = []

    def square(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        seen.append((name, tuple(param.shape), type(module).__name__))
        return param.shape[0] == param.shape[1]

    both = select_parameters(llama, include="*.self_attn.*", predicate=square)
    assert {w.component for w in both.watched} == {"self_attn.q_proj", "self_attn.o_proj"}  # AND with include
    assert ("model.layers.0.self_attn.k_proj.weight", (16, 32), "Linear") in seen
    assert not any(name.startswith("lm_head") for name, _, _ in seen), "predicate runs after the name filters"
    assert select_parameters(llama, include="*nothing*").watched == []


def test_filtered_embeddings_go_to_excluded(llama: nn.Module) -> None:
    selection = select_parameters(llama, include="model.embed_tokens.*")
    assert (selection.watched, selection.excluded) == ([], ["model.embed_tokens.weight"])
    assert "include_embeddings=True" in selection.describe_empty(llama)


def test_module_types(gpt2: nn.Module, llama: nn.Module) -> None:
    # nn.Linear also matches GPT-2's Conv1D, a linear layer stored transposed
    assert len(select_parameters(gpt2, module_types=[nn.Linear]).watched) == 9
    only_conv1d = select_parameters(gpt2, module_types=[Conv1D])
    assert len(only_conv1d.watched) == 8 and only_conv1d.excluded == []
    embeddings = select_parameters(llama, module_types=(nn.Embedding,), include_embeddings=True)
    assert [w.name for w in embeddings.watched] == ["model.embed_tokens.weight"]
    norms = select_parameters(llama, module_types=[type(llama.model.norm)])
    assert norms.watched == [] and "model.norm.weight" in norms.excluded  # 1-D: no matrix form


def test_describe_empty_lists_names(llama: nn.Module) -> None:
    message = select_parameters(llama, regex="^vision").describe_empty(llama)
    assert message.startswith("No parameter of LlamaForCausalLM was selected (regex='^vision').")
    assert "'model.embed_tokens.weight'" in message and ", ..." in message
    for p in llama.parameters():
        p.requires_grad_(False)
    try:
        message = select_parameters(llama).describe_empty(llama)
    finally:
        for p in llama.parameters():
            p.requires_grad_(True)
    assert "16 matched but are frozen (requires_grad=False)" in message
