"""Attention rows of chosen query positions, captured through transformers' attention interface.

Every attention module of a transformers model ends its forward with
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)(module, query, key,
value, attention_mask, scaling=..., dropout=..., **kwargs)`, after its own projections, norms, gates and
(M-)RoPE. `capture_rows` switches the configs of the captured modules to the implementation registered here
as "lavender" for one forward pass. That function computes `softmax(q_rows k^T * scaling + mask)` for the
captured modules from the very query, key and mask it is given, then hands every call (captured or not: other
layers, a vision tower sharing the config) to the kernel the config had before ("sdpa", "eager" or one a user
registered), so the model's outputs are bit-identical to the stock kernel's. The "lavender" mask function
returns exactly the mask that kernel would get. Nothing here knows a family's projections or rotary
embedding; only the `learn` aggregation's parallel W_Qd, W_Kd need the family (`learned_query_key`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    flash_attention_mask,
    flex_attention_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

LAVENDER = "lavender"  # the attention implementation name a capture switches its configs to
WORKING_KERNELS = ("'sdpa', 'eager', or a kernel registered with a 4-D mask function (e.g. "
                   "`AttentionMaskInterface.register(name, transformers.masking_utils.sdpa_mask)`)")

# While captures are active: the configs they switched, with the implementation each had before (by id, as
# configs are not hashable), and the capture of each captured attention module.
_ORIGINALS: dict[int, tuple[object, str | None]] = {}
_CAPTURES: dict[nn.Module, _Capture] = {}
_STOCK_GET_INTERFACE = AttentionInterface.get_interface


def text_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a `...ForConditionalGeneration` VLM (or its inner model)."""
    inner = getattr(model, "model", model)
    return inner.language_model.layers


def take_rows(x: torch.Tensor, rows: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The positions `rows` of `x` (B, ..., S, ...), S at `dim`: (B, ..., R, ...).

    `rows` is None (all positions), (R,) (the same for every sample) or (B, R) (each sample's own); a batch
    dimension of 1 in `x` is broadcast to B.
    """
    if rows is None:
        return x
    rows = rows.to(x.device)
    if rows.dim() == 1:
        return x.index_select(dim, rows)
    x = x.expand(rows.shape[0], *x.shape[1:])
    shape = [rows.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = rows.shape[1]
    index = rows.view(shape).expand(*x.shape[:dim], rows.shape[1], *x.shape[dim + 1:])  # (B, ..., R, ...)
    return x.gather(dim, index)


def attention_rows(q: torch.Tensor, k: torch.Tensor, scaling: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) in float32 for queries (B, H, R, D) and keys (B, KVH, N, D): (B, H, R, N).

    q and k are upcast to float32 before the product. Each key head serves H / KVH consecutive query heads
    (GQA), computed as one (B, KVH, H / KVH * R, D) x (B, KVH, D, N) product, so K is never repeated per query
    head and backward keeps only K itself (in float32). `mask` is boolean (True = may attend) or additive,
    broadcastable to (B, H, R, N).
    """
    b, h, r, d = q.shape
    kvh, n = k.shape[1], k.shape[2]
    grouped = q.float().reshape(b, kvh, h // kvh * r, d)  # (B, KVH, groups * R, D), heads of a group together
    scores = (grouped @ k.float().transpose(-1, -2)).view(b, h, r, n) * scaling  # (B, H, R, N)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    return scores.softmax(dim=-1)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, ..., heads * head_dim) projections over the positions -> (B, heads, positions, head_dim)."""
    return x.reshape(x.shape[0], -1, x.shape[-1] // head_dim, head_dim).transpose(1, 2)


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# query rows (B, H, R, D) and keys (B, KVH, N, D) of `learn`'s W_Qd, W_Kd, from the attention module, its two
# projections, the arguments its forward was called with, and the rows
LearnedQueryKey = Callable[[nn.Module, nn.Module, nn.Module, dict, "torch.Tensor | None"],
                           tuple[torch.Tensor, torch.Tensor]]


class _Capture:
    """One `capture_rows` context: which modules, which rows, and where their attention rows go."""

    def __init__(self, layers: dict[nn.Module, int], rows: torch.Tensor | None, learned: LearnedProjections | None,
                 learned_query_key: LearnedQueryKey | None):
        self.layers, self.rows, self.learned, self.learned_query_key = layers, rows, learned, learned_query_key
        self.captured: dict[int, torch.Tensor] = {}
        self.inputs: dict[nn.Module, dict] = {}  # `learn`: the arguments of each module's forward

    def keep_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inputs[module] = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask, kwargs: dict,
               kernel: str | None) -> None:
        """Rows of `module` from the (B, H, S, D) queries, (B, KVH, N, D) keys and mask its kernel is given."""
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            raise ValueError(f"capture cannot read the {type(mask).__name__} attention mask that the {kernel!r} "
                             f"kernel is given; it works with {WORKING_KERNELS}")
        rows = self.rows
        if rows is not None and rows.dim() == 2 and rows.shape[0] != query.shape[0]:
            raise ValueError(f"per-sample rows of shape {tuple(rows.shape)} for a batch of {query.shape[0]}")
        layer, n = self.layers[module], key.shape[2]
        scaling = kwargs.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        # The rows keep their graph even inside an activation-checkpointed layer: their saved tensors are kept as
        # they are, since the recomputation in backward runs without the capture and could not rebuild them.
        # `learn` in training builds a graph even when the model runs without one (Aligner pretraining).
        grad = torch.is_grad_enabled() or (self.learned is not None and self.learned.training)
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), torch.set_grad_enabled(grad):
            if self.learned is None:
                q, k = take_rows(query, rows, 2), key  # (B, H, R, D), (B, KVH, N, D)
            else:
                name = str(layer)
                q, k = self.learned_query_key(module, self.learned.q[name], self.learned.k[name],
                                              self.inputs[module], rows)
            if mask is not None:
                mask = mask[..., :n] if mask.shape[2] == 1 else take_rows(mask[..., :n], rows, 2)  # (B|1, H|1, R|1, N)
            elif _causal_without_mask(module, query, kwargs, kernel):
                positions = torch.arange(query.shape[2], device=q.device) if rows is None else rows.to(q.device)
                mask = torch.arange(n, device=q.device) <= positions[..., None]  # (R, N) or (B, R, N)
                mask = mask[:, None] if mask.dim() == 3 else mask  # broadcast over heads
            self.captured[layer] = attention_rows(q, k, scaling, mask)


def _causal_without_mask(module: nn.Module, query: torch.Tensor, kwargs: dict, kernel: str | None) -> bool:
    """Whether a kernel given no mask attends causally: SDPA (and kernels built on it) do for several queries
    of a causal module, eager adds no mask at all."""
    if kernel in (None, "eager"):
        return False
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    return bool(causal) and query.shape[2] > 1


def lavender_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, _default: Callable | None = None, **kwargs):
    """The "lavender" attention implementation: records the rows of a captured module, then returns what the
    config's own kernel returns for the same call. `_default` is the eager function the calling module passed
    to `get_interface` (the kernel when the config's implementation was "eager")."""
    original = _ORIGINALS.get(id(module.config))
    if original is None:
        raise ValueError(f"the {LAVENDER!r} attention implementation works only inside a VLM adapter's `capture`")
    kernel_name = original[1]
    kernel = _STOCK_GET_INTERFACE(ALL_ATTENTION_FUNCTIONS, kernel_name, _default)
    if kernel is None:
        raise ValueError(f"the {kernel_name!r} kernel of {type(module).__name__} could not be found: the module "
                         "looked up its attention without `ALL_ATTENTION_FUNCTIONS.get_interface`")
    capture = _CAPTURES.get(module)
    if capture is not None:
        capture.record(module, query, key, attention_mask, kwargs, kernel_name)
    return kernel(module, query, key, value, attention_mask, **kwargs)


def lavender_mask(*args, config, **kwargs):
    """The "lavender" mask function: the mask the config's own implementation gets (none for a kernel registered
    without a mask function, as transformers does)."""
    original = _ORIGINALS.get(id(config))
    if original is None:
        raise ValueError(f"the {LAVENDER!r} attention implementation works only inside a VLM adapter's `capture`")
    if original[1] not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[original[1]](*args, config=config, **kwargs)


def _get_interface(self: AttentionInterface, attn_implementation: str | None, default: Callable) -> Callable:
    """`AttentionInterface.get_interface` while captures are active: "lavender" comes with the caller's eager
    function, which is that module's kernel when its config was "eager"."""
    if attn_implementation == LAVENDER:
        return partial(lavender_attention, _default=default)
    return _STOCK_GET_INTERFACE(self, attn_implementation, default)


AttentionInterface.register(LAVENDER, lavender_attention)
AttentionMaskInterface.register(LAVENDER, lavender_mask)


def check_kernel(name: str | None) -> None:
    """Refuse a kernel whose mask the capture cannot read: flash attention (a padding vector or nothing), flex
    attention (a block mask), paged attention; and a config already being captured. Raises `ValueError`."""
    if name == LAVENDER:
        raise ValueError("a capture is already active on this model")
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name)
    unreadable = mask_function in (flash_attention_mask, flex_attention_mask)
    if unreadable or (name is not None and any(kind in name for kind in ("flash", "flex", "paged"))):
        raise ValueError(f"capture cannot read the attention mask that the {name!r} kernel is given (no 4-D mask); "
                         f"it works with {WORKING_KERNELS}: e.g. `model.set_attn_implementation('sdpa')`")


def _checked_rows(rows: torch.Tensor | None) -> torch.Tensor | None:
    if rows is None:
        return None
    integer = isinstance(rows, torch.Tensor) and not rows.is_floating_point() and rows.dtype != torch.bool
    if not integer or rows.dim() not in (1, 2):
        raise ValueError("rows must be None, a 1-D LongTensor (R,) or a 2-D LongTensor (B, R)")
    return rows.long()


@contextmanager
def capture_rows(layers: dict[nn.Module, int], rows: torch.Tensor | None = None,
                 learned: LearnedProjections | None = None,
                 learned_query_key: LearnedQueryKey | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record the attention rows of the given modules (`attention module -> layer index`) during a forward pass.

    Yields a dict that fills with `layer -> (B, heads, R, keys)` float32 probabilities, for the query positions
    `rows`: None (all, R = S), (R,) for every sample, or (B, R) per sample (padding entries may repeat a row).
    The keys are those the module's kernel sees (the whole sequence for self-attention, the image keys for
    cross-attention), under its own mask. The rows keep the autograd graph (a loss on them trains the q and
    k projections, LoRA included); with `learned`, q and k come from its W_Qd, W_Kd through
    `learned_query_key` instead. On exit every config gets its implementation back.

    Raises `ValueError` for rows of another shape, for a kernel whose mask cannot be read (`check_kernel`),
    and when a capture is already active on the model.
    """
    rows = _checked_rows(rows)
    if learned is not None and learned_query_key is None:
        raise ValueError("learned projections need the family's `learned_query_key`")
    configs = {id(module.config): module.config for module in layers}
    for config in configs.values():
        check_kernel(config._attn_implementation)
    capture = _Capture(layers, rows, learned, learned_query_key)
    handles = ([m.register_forward_pre_hook(capture.keep_inputs, with_kwargs=True) for m in layers]
               if learned is not None else [])
    if not _ORIGINALS:
        AttentionInterface.get_interface = _get_interface
    for key, config in configs.items():
        _ORIGINALS[key] = (config, config._attn_implementation)
        config._attn_implementation_internal = LAVENDER  # this config only, not its sub-configs
    _CAPTURES.update(dict.fromkeys(layers, capture))
    try:
        yield capture.captured
    finally:
        for handle in handles:
            handle.remove()
        for module in layers:
            _CAPTURES.pop(module, None)
        for key in configs:
            config, original = _ORIGINALS.pop(key)
            config._attn_implementation_internal = original
        if not _ORIGINALS and AttentionInterface.get_interface is _get_interface:
            AttentionInterface.get_interface = _STOCK_GET_INTERFACE


def gathered(module: nn.Module) -> AbstractContextManager:
    """Context in which `module`'s own parameters are whole. DeepSpeed ZeRO-3 leaves each rank an empty
    placeholder of every parameter (marked by `ds_id`); they are gathered, read-only, for the duration."""
    partitioned = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def linear_copy(projection: nn.Module, outputs: torch.Tensor | None = None) -> nn.Linear:
    """A float32 `nn.Linear` equal to `projection` (its base layer if peft wraps it), or to its `outputs` only
    (indices of output features); works on ZeRO-3 partitioned parameters (`gathered`)."""
    base = projection.get_base_layer() if hasattr(projection, "get_base_layer") else projection
    with gathered(base), torch.no_grad():
        weight = base.weight.detach()  # (out, in)
        bias = None if base.bias is None else base.bias.detach()
        if outputs is not None:
            weight, bias = weight[outputs], None if bias is None else bias[outputs]
        copy = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                         dtype=torch.float32)
        copy.weight.copy_(weight)
        if bias is not None:
            copy.bias.copy_(bias)
    return copy


class LearnedProjections(nn.Module):
    """The `learn` aggregation's parallel W_Qd, W_Kd per aligned layer, used only for the alignment loss.

    Float32 copies of each attention module's own `q_proj` and `k_proj` (biases included), so that at the
    start the rows they give equal the layer's attention; training them moves the attention the loss sees,
    never the model's. `q` and `k` map `str(layer)` to the copies.
    """

    def __init__(self, attention_modules: dict[int, nn.Module]):
        super().__init__()
        self.q = nn.ModuleDict({str(i): self.copy_query(m) for i, m in attention_modules.items()})
        self.k = nn.ModuleDict({str(i): linear_copy(m.k_proj) for i, m in attention_modules.items()})
        for p in self.parameters():
            p.requires_grad_(True)

    def copy_query(self, attention: nn.Module) -> nn.Linear:
        return linear_copy(attention.q_proj)


def image_key_positions(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its image tokens, in order; refuses more than one image."""
    positions = [row.nonzero().squeeze(-1) for row in input_ids == image_token_id]
    for b, pos in enumerate(positions):
        if pos.numel() and (pos.diff() != 1).any():
            raise ValueError(f"alignment supports one image per sample; sample {b} has several image-token runs")
    return positions


def keys_to_plane(values: torch.Tensor, positions: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(..., S) attention over the sequence -> (..., rows, cols) over one image's tokens, row-major."""
    if positions.numel() != rows * cols:
        raise ValueError(f"expected {rows} x {cols} = {rows * cols} image tokens, found {positions.numel()}")
    return values[..., positions].reshape(*values.shape[:-1], rows, cols)
