"""ImpliedGradients and the adapter-aware selection: D^T X of frozen linear layers equals the gradient autograd
gives the same weight made trainable (float64), with padding, accumulation, frozen inputs and stale graphs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from gradspectra.capture import ImpliedGradients, WatchedParameter, adapter_wrappers, base_path, select_parameters

peft = pytest.importorskip("peft")  # the `lora` extra; installed by `.[test]`


def _frozen(lin: nn.Linear) -> WatchedParameter:
    lin.requires_grad_(False)
    return WatchedParameter("fc.weight", "fc", None, "fc", lin.weight, lin, implied=True)


def test_matrix_equals_the_gradient_of_the_same_weight_made_trainable() -> None:
    torch.manual_seed(0)
    frozen = nn.Linear(12, 7).double()
    trained = copy.deepcopy(frozen)
    implied = ImpliedGradients([_frozen(frozen)])
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 7, dtype=torch.float64)
    (torch.tanh(frozen(x)) * target).sum().backward()
    (torch.tanh(trained(x)) * target).sum().backward()
    g = implied.matrix(0)
    assert g is not None and g.dtype == torch.float64
    torch.testing.assert_close(g, trained.weight.grad, rtol=1e-12, atol=0)
    assert frozen.weight.grad is None  # the frozen weight itself stays untouched
    implied.close()


def test_frozen_input_still_gets_output_gradients() -> None:
    # nothing upstream needs a gradient (frozen embeddings): the hook asks autograd for the output's all the same
    torch.manual_seed(1)
    frozen = nn.Linear(6, 4).double()
    trained = copy.deepcopy(frozen)
    head = nn.Linear(4, 1).double()
    implied = ImpliedGradients([_frozen(frozen)])
    x = torch.randn(9, 6, dtype=torch.float64)  # requires no grad
    head(torch.relu(frozen(x))).sum().backward()
    head.zero_grad()
    head(torch.relu(trained(x))).sum().backward()
    torch.testing.assert_close(implied.matrix(0), trained.weight.grad, rtol=1e-12, atol=0)
    implied.close()


def test_factors_drop_padding_and_reproduce_the_matrix() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(16, 16).double()
    implied = ImpliedGradients([_frozen(lin)])
    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    (lin(x).pow(2).sum(-1) * mask).sum().backward()
    assert implied.tokens(0) == 8
    parts = implied.factors(0)
    assert parts is not None
    delta, inputs = parts
    assert delta.shape == (5, 16) and inputs.shape == (5, 16)  # the 3 padding rows carry no gradient
    torch.testing.assert_close(delta.mT @ inputs, implied.matrix(0), rtol=1e-12, atol=1e-14)
    assert implied.factors(0) is not None  # still there after the matrix was formed
    implied.close()


def test_accumulation_folds_rows_and_bounds_memory() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(8, 6).double()
    trained = copy.deepcopy(lin)
    implied = ImpliedGradients([_frozen(lin)])
    sizes = []
    for _ in range(5):  # 5 micro-batches of 4 x 3 tokens, min(m, n) = 6: folded from the second on
        x = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
        lin(x).sin().sum().backward()
        trained(x).sin().sum().backward()
        sizes.append(implied.kept_bytes())
    torch.testing.assert_close(implied.matrix(0), trained.weight.grad, rtol=1e-12, atol=0)
    assert implied.factors(0) is None  # rows were folded away: no T x T route this step
    rows_bytes = 12 * (6 + 8) * 8
    assert max(sizes) <= rows_bytes + 6 * 8 * 8 + 2 * 12 * 8 * 8  # one micro-batch's rows and one matrix
    assert implied.tokens(0) == 60
    implied.close()


def test_clear_releases_and_ignores_stale_graphs() -> None:
    lin = nn.Linear(5, 5)
    implied = ImpliedGradients([_frozen(lin)])
    x = torch.randn(3, 5, requires_grad=True)
    out = lin(x).sum()
    implied.clear()  # the optimizer step came between the forward and this backward
    out.backward()
    assert not implied.has(0) and implied.matrix(0) is None and implied.kept_bytes() == 0
    implied.enabled = False
    lin(x).sum().backward()
    assert not implied.has(0)
    implied.close()


def test_rows_that_do_not_fit_the_weight_break_the_layer_for_the_step() -> None:
    lin = nn.Linear(4, 3)
    implied = ImpliedGradients([_frozen(lin)])
    x = torch.randn(2, 4, requires_grad=True)
    y = lin(x)
    y.register_hook(lambda g: g)
    # a user hook that changes the output gradient's shape is not possible; simulate a layer called on a view
    implied._keep(0, implied._generation, x.detach(), torch.ones(3, 3))
    assert not implied.has(0) and implied.matrix(0) is None
    implied.close()


def _tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def _lora(model: nn.Module, targets: list[str]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0)
        return peft.get_peft_model(model, config)


def test_peft_layers_are_named_and_matched_as_their_base() -> None:
    model = _lora(_tiny_llama(), ["q_proj", "v_proj"])
    wrappers = adapter_wrappers(model)
    assert set(wrappers.values()) == {"default"} and len(wrappers) == 4
    assert base_path("base_model.model.model.layers.1.self_attn.v_proj.base_layer", wrappers) == (
        "base_model.model.model.layers.1.self_attn.v_proj"
    )
    sel = select_parameters(model, include="*.self_attn.*_proj.weight")  # the papers' pattern, unchanged
    assert [(w.key, w.adapter) for w in sel.watched] == [
        (f"self_attn.{p}_proj/layer_{i:02d}", "default" if p in "qv" else None) for i in range(2) for p in "qkvo"
    ]
    assert all(w.implied and not w.param.requires_grad for w in sel.watched)
    assert sel.watched[0].name == "model.layers.0.self_attn.q_proj.weight"  # as without adapters
    # default: what the adapters wrap, no adapter matrix of its own
    default = select_parameters(model)
    assert [w.key for w in default.watched] == [f"self_attn.{p}_proj/layer_{i:02d}" for i in range(2) for p in "qv"]
    # the real name still matches, and today's behaviour is one argument away
    assert len(select_parameters(model, include="*.q_proj.base_layer.weight").watched) == 2
    params = select_parameters(model, gradients="parameters")
    assert [w.key for w in params.watched][:2] == [
        "self_attn.q_proj.lora_A.default/layer_00",
        "self_attn.q_proj.lora_B.default/layer_00",
    ]
    assert not any(w.implied for w in params.watched)
    assert "model.layers.0.self_attn.q_proj.weight" in params.frozen
    every = select_parameters(model, gradients="implied")
    assert len(every.watched) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert every.watched[-1].key == "lm_head"


def test_plain_frozen_layers_need_an_explicit_filter_under_auto() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    assert [w.name for w in select_parameters(model).watched] == ["2.weight"]  # today's default, unchanged
    sel = select_parameters(model, include="*.weight")
    assert [(w.name, w.implied) for w in sel.watched] == [("0.weight", True), ("2.weight", False)]
    assert select_parameters(model, include="*.weight", gradients="parameters").frozen == ["0.weight"]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_peft_implied_gradients_equal_the_trainable_base_weights(family: str) -> None:
    """Float64: each frozen base weight's D^T X equals the .grad autograd gives it when made trainable."""
    if family == "llama":
        model = _tiny_llama(4).double()
        targets = ["q_proj", "v_proj"]
        include = "*.self_attn.*_proj.weight"
    else:
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(4)
        config = BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = BertForSequenceClassification(config).double()
        targets = ["query", "value"]
        include = "*.attention.self.*.weight"
    twin = copy.deepcopy(model)
    frozen, trainable = _lora(model, targets), _lora(twin, targets)
    trainable.load_state_dict(frozen.state_dict())
    watched = select_parameters(frozen, include=include).watched
    assert watched and all(w.implied for w in watched)
    for p in trainable.parameters():
        p.requires_grad_(True)
    implied = ImpliedGradients(watched)
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    for net in (frozen, trainable):
        if family == "llama":
            labels = ids.masked_fill(mask == 0, -100)
            net(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        else:
            net(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss.backward()
    reference = dict(trainable.named_parameters())
    for i, w in enumerate(watched):
        real = next(n for n, p in frozen.named_parameters() if p is w.param)
        want = reference[real].grad
        got = implied.matrix(i)
        assert want is not None and got is not None, w.key
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    implied.close()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_token_once(reentrant: bool) -> None:
    """The forward runs twice under checkpointing; only the pass the backward goes through is kept."""
    model = _lora(_tiny_llama(5), ["q_proj", "v_proj"]).double()
    twin = copy.deepcopy(model)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # what transformers does for reentrant checkpointing of a peft model
    model.train()
    watched = select_parameters(model, include="*.self_attn.*_proj.weight").watched
    implied = ImpliedGradients(watched)
    ids = torch.randint(0, 64, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids, labels=ids).loss.backward()
    for name, p in twin.named_parameters():
        if ".self_attn." in name and not p.requires_grad:
            p.requires_grad_(True)
    twin(input_ids=ids, labels=ids).loss.backward()
    reference = dict(twin.named_parameters())
    for i, w in enumerate(watched):
        assert implied.tokens(i) == 18, w.key
        real = next(n for n, p in model.named_parameters() if p is w.param)
        torch.testing.assert_close(implied.matrix(i), reference[real].grad, rtol=1e-9, atol=1e-14)
    implied.close()


def test_a_nan_output_gradient_is_not_dropped_as_padding() -> None:
    lin = nn.Linear(6, 4)
    implied = ImpliedGradients([_frozen(lin)])
    x = torch.randn(5, 6, requires_grad=True)
    weights = torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.0])
    (lin(x).sum(-1) * weights).sum().backward()
    assert bool(torch.isnan(implied.matrix(0)).all())
    implied.close()


def test_gpt2_conv1d_layers_with_lora_equal_their_trainable_twin() -> None:
    """peft wraps GPT-2's Conv1D (weight stored in x out) too: D^T X in the out x in orientation of as_matrix."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gradspectra.functional import as_matrix

    torch.manual_seed(6)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    base = GPT2LMHeadModel(config).double()
    twin = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
        frozen, trainable = peft.get_peft_model(base, lora), peft.get_peft_model(twin, lora)
    trainable.load_state_dict(frozen.state_dict())
    watched = select_parameters(frozen, include="*.attn.c_*.weight").watched
    assert [w.key for w in watched] == [f"attn.c_{p}/layer_{i:02d}" for i in range(2) for p in ("attn", "proj")]
    assert all(w.implied for w in watched)
    implied = ImpliedGradients(watched)
    for p in trainable.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 64, (2, 8))
    for net in (frozen, trainable):
        net(input_ids=ids, labels=ids).loss.backward()
    reference = dict(trainable.named_parameters())
    for i, w in enumerate(watched):
        real = next(n for n, p in frozen.named_parameters() if p is w.param)
        want = as_matrix(reference[real].grad, w.module)
        torch.testing.assert_close(implied.matrix(i), want, rtol=1e-9, atol=1e-14)
    implied.close()


def test_in_place_ops_after_a_layer_with_nothing_trained_upstream_still_train() -> None:
    """The output of a frozen layer whose input needs no gradient is a copy that requires one, not a leaf:
    an in-place ReLU after it is legal, and the implied gradient equals the trainable twin's."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    model[0].requires_grad_(False)
    watched = select_parameters(model, include="*.weight").watched
    assert [(w.name, w.implied) for w in watched] == [("0.weight", True), ("2.weight", False)]
    implied = ImpliedGradients(watched)
    x = torch.randn(5, 6, dtype=torch.float64)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    torch.testing.assert_close(implied.matrix(0), twin[0].weight.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(model[2].weight.grad, twin[2].weight.grad, rtol=1e-12, atol=0)
    implied.close()


def test_an_input_changed_in_place_after_the_layer_breaks_the_step_not_the_value() -> None:
    lin = nn.Linear(4, 4)
    implied = ImpliedGradients([_frozen(lin)])
    x = torch.randn(3, 4, requires_grad=True).clone()
    y = lin(x)
    x.mul_(3.0)  # legal for the user (autograd saved nothing of x for a frozen layer), but D^T X would be wrong
    (y.sum() + x.sum()).backward()
    assert not implied.has(0) and 0 in implied.broken
    implied.close()


def test_a_non_finite_input_on_a_padding_row_shows_as_nan() -> None:
    """0 x inf is NaN in autograd's product too: a row with no output gradient but a bad input is kept."""
    lin = nn.Linear(8, 6)
    implied = ImpliedGradients([_frozen(lin)])
    x = torch.randn(4, 8)
    x[2, 1] = float("inf")
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None]
    (lin(x.requires_grad_()) * weights).sum().backward()
    assert not bool(torch.isfinite(implied.matrix(0)).all())
    parts = implied.factors(0)
    assert parts is not None and parts[0].shape[0] == 4
    implied.close()


def test_a_user_module_with_a_base_layer_child_is_not_an_adapter() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_layer, self.refine = nn.Linear(4, 4), nn.Linear(4, 4)

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    assert adapter_wrappers(model) == {}
    names = [w.name for w in select_parameters(model).watched]
    assert names == ["0.base_layer.weight", "0.refine.weight", "1.weight"]


def test_a_tied_frozen_weight_is_not_measured_by_a_part_of_its_gradient() -> None:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second, nn.Linear(4, 2))
    first.requires_grad_(False)
    sel = select_parameters(model, include="*.weight")
    assert [w.name for w in sel.watched] == ["3.weight"] and sel.frozen == ["0.weight"]
