"""The adapters of every family, through one suite parametrised over the family testers (`vlm_testers.py`):
captured rows equal the eager attention under every kernel and leave the logits exact, per-sample rows, bf16
precision, gradients (checkpointing, LoRA), the `learn` projections, kernels that are refused; then the
registry and the path from rows to the image plane."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from minicpmv_testers import KINDS, MiniCPMVTester
from qwen2_vl_testers import Qwen2VLTester
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward
from vlm_testers import (
    IMAGE_TOKEN,
    TILES,
    LlavaTester,
    MllamaTester,
    llava_inputs,
    mllama_inputs,
    tiny_llava,
    tiny_mllama,
)

from lavender.vlm.attention import LAVENDER, attention_rows, linear_copy
from lavender.vlm.base import VLMAdapter, adapter_for, register_adapter, supported_model_types

TESTERS = [MllamaTester(), LlavaTester(), Qwen2VLTester(), Qwen2VLTester(qwen2_5=True),
           *(MiniCPMVTester(kind) for kind in KINDS)]
FAMILIES = TESTERS[:3] + TESTERS[4:5]  # one tester per family, for all but the equivalence test
by_family = pytest.mark.parametrize("tester", FAMILIES, ids=lambda t: t.id)

# A kernel chosen by the user: SDPA behind a name of its own, with SDPA's mask; it counts its calls.
USER_KERNEL, USER_CALLS = "user_sdpa", []


def user_sdpa(module, *args, **kwargs):
    USER_CALLS.append(type(module).__name__)
    return sdpa_attention_forward(module, *args, **kwargs)


AttentionInterface.register(USER_KERNEL, user_sdpa)
AttentionMaskInterface.register(USER_KERNEL, sdpa_mask)

# A stand-in for flash attention: its mask function gives a 2-D padding mask or nothing, which capture cannot read.
STAND_IN = "stand_in_varlen"
AttentionInterface.register(STAND_IN, sdpa_attention_forward)
AttentionMaskInterface.register(STAND_IN, flash_attention_mask)


# Eager attention (transformers' own, the same in every family here) that keeps what it was given and its
# probabilities, per module.
RECORDING, RECORDED = "recording_eager", {}


def recording_eager(module, query, key, value, attention_mask, **kwargs):
    if not hasattr(module, "num_key_value_groups"):  # Llama's eager function reads it; IDEFICS v1 has no GQA
        module.num_key_value_groups = query.shape[1] // key.shape[1]
    output, probabilities = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    RECORDED[module] = (query, key, attention_mask, kwargs["scaling"], probabilities)
    return output, probabilities


AttentionInterface.register(RECORDING, recording_eager)
AttentionMaskInterface.register(RECORDING, eager_mask)


def text_implementation(model) -> str:
    return model.config.get_text_config()._attn_implementation  # IDEFICS v1 keeps its text settings at the top


# -- capture ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tester, attn", [
    *(pytest.param(t, attn, id=f"{attn}-{t.id}") for t in TESTERS for attn in ("sdpa", "eager")),
    *(pytest.param(t, USER_KERNEL, id=f"{USER_KERNEL}-{t.id}") for t in FAMILIES),
])
def test_rows_equal_eager_attention_and_logits_stay_exact(tester, attn):
    """fp32 rows equal the eager model's probabilities (1e-5) with SDPA, with the model set to eager and with a
    kernel the user registered; padding, later positions and padding tiles get nothing; the logits during the
    capture are bit-identical to the same model's without it, and its kernel comes back afterwards."""
    eager = tester.build_model("eager")
    model = tester.build_model("sdpa")
    model.load_state_dict(eager.state_dict())
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    adapter = adapter_for(model)
    for batch in tester.batches():
        rows = tester.rows(batch)
        with torch.no_grad():
            reference = tester.reference(eager, batch)
            stock = model(**batch).logits
            USER_CALLS.clear()
            with adapter.capture(list(tester.layers), rows) as captured:
                logits = model(**batch).logits
        assert torch.equal(logits, stock)
        assert (len(USER_CALLS) > 0) == (attn == USER_KERNEL)  # the user's kernel ran the layers
        unseen = tester.unseen(batch, rows)[:, None].expand_as(captured[tester.layers[0]])  # (B, heads, R, keys)
        for layer in tester.layers:
            expected = reference[layer][:, :, rows]
            assert captured[layer].shape == expected.shape and captured[layer].dtype == torch.float32
            torch.testing.assert_close(captured[layer], expected, atol=1e-5, rtol=1e-5)
            assert captured[layer][unseen].abs().max() < 1e-6
    assert text_implementation(model) == attn


@by_family
def test_per_sample_rows_equal_the_same_rows_shared(tester):
    """(B, R) rows give each sample what (R,) rows give it, padding entries repeating a row; `learn` too."""
    model = tester.build_model("sdpa")
    adapter = adapter_for(model)
    layers = list(tester.layers)
    batch = tester.batches()[0]
    first = tester.rows(batch)
    second = first.flip(0)
    second[-1] = second[0]  # a padding entry
    learned = adapter.learned_projections(layers)
    for parallel in (None, learned):
        with torch.no_grad():
            with adapter.capture(layers, torch.stack([first, second]), parallel) as both:
                model(**batch)
            with adapter.capture(layers, first, parallel) as one:
                model(**batch)
            with adapter.capture(layers, second, parallel) as two:
                model(**batch)
        for layer in layers:
            torch.testing.assert_close(both[layer][0], one[layer][0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(both[layer][1], two[layer][1], atol=1e-6, rtol=1e-6)


@by_family
def test_bf16_rows_keep_float32_precision(tester):
    """In bf16, q and k are upcast before their product: against a float64 softmax of the very bf16 q, k and mask
    the kernel is given, the rows' error is under 1% of the bf16 eager kernel's own probabilities' error (measured
    on the same call); rows come back in float32, and so are `learn`'s copies of the projections."""
    model = tester.build_model("sdpa").to(torch.bfloat16)
    if hasattr(model.config, "text_config"):
        model.set_attn_implementation({"text_config": RECORDING})  # the vision tower keeps SDPA
    else:  # IDEFICS v1 keeps its text settings at the top, its tower's apart
        model.set_attn_implementation(RECORDING)
        model.config.vision_config._attn_implementation = "sdpa"
    adapter = adapter_for(model)
    batch = tester.batches()[0]
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    rows = tester.rows(batch)
    RECORDED.clear()
    with torch.no_grad(), adapter.capture(list(tester.layers), rows) as captured:
        model(**batch)
    for layer in tester.layers:
        q, k, mask, scaling, probabilities = RECORDED[adapter.attention_module(layer)]
        k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, N, D)
        scores = q[:, :, rows].double() @ k.transpose(-1, -2) * scaling  # (B, H, R, N)
        exact = (scores if mask is None else scores + mask[:, :, rows].double()).softmax(-1)
        rows_error = (captured[layer].double() - exact).abs().max()
        kernel_error = (probabilities[:, :, rows].double() - exact).abs().max()
        assert captured[layer].dtype == torch.float32
        assert rows_error <= kernel_error / 100, (layer, float(rows_error), float(kernel_error))
    learned = adapter.learned_projections(list(tester.layers))
    assert {p.dtype for p in learned.parameters()} == {torch.float32}


@by_family
def test_rows_train_q_and_k_also_checkpointed_and_through_lora(tester):
    """A loss on the rows reaches q_proj and k_proj, with the same gradients under non-reentrant gradient
    checkpointing, and reaches LoRA adapters on them."""
    import peft

    batch = tester.batches()[0]
    rows, key, layer = tester.rows(batch), tester.image_key(batch), tester.layers[-1]

    def grads(model):
        adapter = adapter_for(model)
        with adapter.capture([layer], rows) as captured:
            model(**batch)
        captured[layer][..., key].sum().backward()
        attn = adapter.attention_module(layer)
        return {n: p.grad for n, p in attn.named_parameters() if p.grad is not None}

    plain = grads(tester.build_model("sdpa").train())
    checkpointed = tester.build_model("sdpa").train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt = grads(checkpointed)
    assert plain["q_proj.weight"].abs().sum() > 0 and plain["k_proj.weight"].abs().sum() > 0
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)
    lora = peft.get_peft_model(tester.build_model("sdpa"), peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    lora_grads = grads(lora)
    for proj in ("q_proj", "k_proj"):
        assert lora_grads[f"{proj}.lora_B.default.weight"].abs().sum() > 0


@by_family
def test_learned_projections_start_equal_and_move_only_the_loss_rows(tester):
    """`learn`'s W_Qd, W_Kd: at the start their rows equal the layer's own (1e-6) and keep a graph even when the
    model runs without one; a loss on them reaches both (and their biases, for a biased family); moving one
    changes the loss's rows but leaves the model's logits exactly as they were."""
    model = tester.build_model("sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = adapter_for(model)
    batch = tester.batches()[0]
    layer, rows, key = tester.layers[-1], tester.rows(batch)[:2], tester.image_key(batch)
    learned = adapter.learned_projections([layer])
    name = str(layer)
    with torch.no_grad():
        with adapter.capture([layer], rows) as own:
            reference = model(**batch).logits
        with adapter.capture([layer], rows, learned) as parallel:
            model(**batch)
    torch.testing.assert_close(parallel[layer], own[layer], atol=1e-6, rtol=1e-6)
    assert parallel[layer].requires_grad
    parallel[layer][..., key].sum().backward()
    for proj in (learned.q[name], learned.k[name]):
        assert proj.weight.grad.abs().sum() > 0
        if tester.biased:
            assert proj.bias.grad.abs().sum() > 0
    with torch.no_grad():
        weight = getattr(learned, tester.move)[name].weight
        weight.add_(0.5 * torch.randn_like(weight))
        with adapter.capture([layer], rows, learned) as moved:
            after = model(**batch).logits
    assert (moved[layer] - own[layer]).abs().max() > 1e-3  # the loss's attention moved...
    assert torch.equal(after, reference)  # ...and the model's did not


@by_family
def test_kernels_without_a_readable_mask_are_refused(tester):
    """A flash-attention-like kernel (a 2-D padding mask or none) is refused before anything changes."""
    model = tester.build_model("sdpa")
    model.set_attn_implementation(STAND_IN)
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match=rf"'{STAND_IN}' kernel .*'sdpa', 'eager'"), adapter.capture(tester.layers):
        pass
    assert text_implementation(model) == STAND_IN


def test_capture_is_installed_for_its_duration_only():
    """Inside: the text config (only) runs "lavender"; a second capture of the same model is refused; after,
    even on an error: the kernel and transformers' lookup come back. Malformed rows are refused."""
    model = tiny_llava("sdpa")
    adapter = adapter_for(model)
    stock_lookup = AttentionInterface.get_interface
    with pytest.raises(RuntimeError, match="inside"), adapter.capture([0]):
        assert text_implementation(model) == LAVENDER and model.config.vision_config._attn_implementation == "sdpa"
        with pytest.raises(ValueError, match="already active"), adapter.capture([1]):
            pass
        raise RuntimeError("inside")
    assert text_implementation(model) == "sdpa" and AttentionInterface.get_interface is stock_lookup
    for rows in (torch.zeros(1, 1, 1, dtype=torch.long), torch.tensor([1.0]), torch.tensor([True])):
        with pytest.raises(ValueError, match="rows must be"), adapter.capture([0], rows):
            pass
    three_rows = torch.zeros(3, 1, dtype=torch.long)  # for a batch of two
    with pytest.raises(ValueError, match="per-sample rows"), torch.no_grad(), adapter.capture([0], three_rows):
        model(**llava_inputs())
    with pytest.raises(ValueError, match="no attention to align"):
        adapter.capture([3])


def test_grouped_query_rows_keep_only_the_keys_for_backward():
    """GQA without repeating K per query head: the rows equal those against the repeated K, and the only key
    tensor kept for backward is K itself."""
    q = torch.randn(2, 8, 3, 4, requires_grad=True)  # (B, H, R, D)
    k = torch.randn(2, 2, 50, 4, requires_grad=True)  # (B, KVH, N, D): 4 query heads per key head
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rows = attention_rows(q, k, 0.5)
    expected = (q @ k.repeat_interleave(4, dim=1).transpose(-1, -2) * 0.5).softmax(-1)
    torch.testing.assert_close(rows, expected)
    keys = [t for t in saved if tuple(t.shape[-2:]) in {(50, 4), (4, 50)}]
    assert keys and all(t.numel() == k.numel() for t in keys)


def test_learned_copies_gather_zero3_parameters_in_float32(monkeypatch):
    """Under DeepSpeed ZeRO-3 a rank holds empty placeholders; the copy gathers the whole parameters (read-only),
    and is float32 whatever the model's dtype. DeepSpeed is not installed: a stand-in gathers as it would."""
    projection = torch.nn.Linear(4, 6).to(torch.bfloat16)
    whole = {name: p.detach().clone() for name, p in projection.named_parameters()}
    for p in projection.parameters():  # what ZeRO-3 leaves on a rank
        p.ds_id, p.ds_numel, p.ds_tensor = id(p), p.numel(), p.data
        p.data = torch.empty(0, dtype=p.dtype)
    calls = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            calls.append((len(params), modifier_rank))
            self.params = params

        def __enter__(self):
            for p in self.params:
                p.data = p.ds_tensor

        def __exit__(self, *exc):
            for p in self.params:
                p.data = torch.empty(0, dtype=p.dtype)

    stand_in = SimpleNamespace(zero=SimpleNamespace(GatheredParameters=GatheredParameters))
    monkeypatch.setitem(sys.modules, "deepspeed", stand_in)
    copy = linear_copy(projection)
    assert calls == [(2, None)] and projection.weight.numel() == 0  # gathered once, read-only, partitioned again
    assert copy.weight.dtype == copy.bias.dtype == torch.float32
    assert torch.equal(copy.weight, whole["weight"].float()) and torch.equal(copy.bias, whole["bias"].float())
    query = linear_copy(projection, torch.tensor([0, 2]))  # some output features only (MiniCPM-V's query half)
    assert torch.equal(query.weight, whole["weight"][[0, 2]].float()) and len(calls) == 2


# -- registry and image planes ------------------------------------------------------------------------------------
def test_registry_picks_the_family_and_names_the_supported_ones():
    assert {"llava", "mllama"} <= set(supported_model_types())
    assert adapter_for(tiny_mllama("sdpa")).family == "mllama"
    assert adapter_for(tiny_llava("sdpa")).family == "llava"
    other = torch.nn.Linear(2, 2)
    other.config = type("Config", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match=r"no VLM adapter for model type 'bert'; supported: .*llava.*mllama"):
        adapter_for(other)


@pytest.mark.parametrize("config_class, missing", [("PaliGemmaConfig", "prefix")])
def test_families_without_an_adapter_are_refused_saying_what_is_missing(config_class, missing):
    import transformers

    model = torch.nn.Linear(2, 2)
    model.config = getattr(transformers, config_class)()  # the real config class: its real model type
    with pytest.raises(ValueError, match=rf"no VLM adapter for model type '{model.config.model_type}' \(.*{missing}"):
        adapter_for(model)


def test_registration_is_validated():
    with pytest.raises(TypeError):
        register_adapter(type("NoFamily", (VLMAdapter,), {}))
    with pytest.raises(ValueError, match="already served"):
        register_adapter(type("Again", (VLMAdapter,), {"family": "x", "model_types": ("mllama",)}))


def test_mllama_rows_reach_the_tile_canvas():
    model = tiny_mllama("sdpa")
    adapter = adapter_for(model)
    batch = mllama_inputs()
    rows = torch.tensor([3, 5])
    with torch.no_grad(), adapter.capture(adapter.alignable_layers(), rows) as captured:
        model(**batch)
    maps = adapter.to_image(captured[1], batch)
    # sample 0 has aspect ratio id 2 -> 1 x 2 tiles, sample 1 id 6 -> 2 x 2; tiles are 2 x 2 patches
    assert [m.shape for m in maps] == [(4, 2, 2, 4), (4, 2, 4, 4)]
    per_tile = 5  # CLS + 2 x 2 patches
    for b, real_tiles in enumerate((2, 4)):  # the canvas holds exactly the patch keys of the real tiles
        keys = torch.cat([torch.arange(t * per_tile + 1, (t + 1) * per_tile) for t in range(real_tiles)])
        torch.testing.assert_close(maps[b].sum(dim=(-1, -2)), captured[1][b][..., keys].sum(-1))
    assert captured[1].shape[-1] == TILES * per_tile


def test_llava_rows_reach_the_patch_grid():
    model = tiny_llava("sdpa")
    adapter = adapter_for(model)
    batch = llava_inputs()
    rows = torch.tensor([20, 23])
    with torch.no_grad(), adapter.capture([1], rows) as captured:
        model(**batch)
    maps = adapter.to_image(captured[1], batch)
    assert [m.shape for m in maps] == [(4, 2, 4, 4)] * 2
    positions = (batch["input_ids"][0] == IMAGE_TOKEN).nonzero().squeeze(-1)
    torch.testing.assert_close(maps[0].flatten(-2), captured[1][0][..., positions])
