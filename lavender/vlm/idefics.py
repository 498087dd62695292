"""IDEFICS v1 (the Flamingo architecture, `IdeficsForVisionText2Text`): gated cross-attention to the image.

The text decoder is Llama-like (`model.model.layers`); before every `cross_layer_interval`-th decoder layer a gated
cross-attention block (`model.model.gated_cross_attn_layers[i].cross_attn`) lets the text attend to the image
states, under the additive mask the model builds from `image_attention_mask` (each text token sees the latest
`<image>` before it, tokens before any image see nothing and their cross-attention output is zeroed). The aligned
layers are those decoder layers' indices, 0, interval, 2 * interval, ...

Keys. Per image the model hands the cross-attention either
- without the resampler (`use_resampler=False`): the vision tower's last hidden states, `[CLS, G x G patches]`,
  the patches row-major over the image (G = image_size / patch_size); the map is the patch grid, CLS left out
  (its key still takes part in the softmax);
- with the resampler: the Perceiver's `resampler_n_latents` latents, which have no place on the image. The map is
  then an approximation: the text-to-latent rows composed with an attention rollout through the Perceiver
  (`perceiver_rollout`), which ignores the Perceiver's MLPs, its final norm and the values, so it says where the
  latents looked, not what they carry.

The image processor stretches every image to a square of `image_size` pixels (never cropped or padded), so the
plane shows the whole image (`image_view`). The stock `IdeficsProcessor` puts every image after the text it is
given; `IdeficsChatProcessor` puts it at the chat template's `<image>` placeholder instead (see there).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from transformers import BatchFeature, IdeficsProcessor
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

from lavender.data.frame import ImageView
from lavender.vlm.attention import split_heads, take_rows
from lavender.vlm.base import VLMAdapter, register_adapter

IMAGE, AROUND = "<image>", "<fake_token_around_image>"


def cross_attention_layers(config) -> list[int]:
    """Indices of the decoder layers that a gated cross-attention block precedes."""
    blocks = config.num_hidden_layers // config.cross_layer_interval
    return [i * config.cross_layer_interval for i in range(blocks)]


def keys_to_patches(values: torch.Tensor, grid: int) -> torch.Tensor:
    """One image's keys (..., 1 + grid**2) -> (..., grid, grid): CLS dropped, the patches row-major."""
    if values.shape[-1] != 1 + grid * grid:
        raise ValueError(f"expected CLS and {grid} x {grid} patch keys, got {values.shape[-1]} keys")
    return values[..., 1:].reshape(*values.shape[:-1], grid, grid)


def perceiver_rollout(attentions: list[torch.Tensor], context: int) -> torch.Tensor:
    """Attention rollout of the Perceiver resampler: how much each output latent draws on each context token.

    `attentions`: per Perceiver block, (B, heads, L, context + L), the latents' attention over
    `cat(context, latents)`, as `IdeficsPerceiverAttention` computes it. With A_t the head mean of block t split into
    its context part C_t (B, L, context) and latent part S_t (B, L, L), and the residual counted as half of each
    block (Abnar & Zuidema's rollout), the latents' context share after block t is
    X_t = C_t / 2 + (S_t + I) / 2 @ X_{t-1}, X_0 = 0 (the learned start latents hold no image). Returns X_T,
    (B, L, context), its rows summing to at most 1 (the rest is the start latents' share).

    An approximation: the MLP after each block, the final layer norm and the values are left out.
    """
    share = None
    for probs in attentions:
        mean = probs.float().mean(1)  # (B, L, context + L)
        to_context, to_latents = mean[..., :context], mean[..., context:]  # (B, L, N), (B, L, L)
        eye = torch.eye(to_latents.shape[-1], device=mean.device)
        share = to_context / 2 if share is None else to_context / 2 + (to_latents + eye) / 2 @ share
    if share is None:
        raise ValueError("the Perceiver ran no attention block")
    return share


def latents_to_patches(rollout: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, L, 1 + grid**2) rollout over `[CLS, patches]` -> (B, L, grid**2) over the patches, each latent's row
    renormalised to sum to 1 (CLS's share dropped)."""
    patches = rollout[..., 1:]  # (B, L, G*G)
    if patches.shape[-1] != grid * grid:
        raise ValueError(f"expected CLS and {grid} x {grid} patches as the Perceiver's context, got "
                         f"{rollout.shape[-1]} tokens")
    return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


class PerceiverRecorder:
    """Records the latents' attention in each Perceiver block during a forward pass, from the queries and keys its
    own `q_proj` and `k_proj` return (forward hooks), through its per-head norms: `probs` holds one
    (B, heads, L, context + L) tensor per block, in order, with a graph to the Perceiver's weights."""

    def __init__(self, resampler: nn.Module):
        self.resampler, self.probs, self._handles, self._qk = resampler, [], [], {}

    def __enter__(self) -> PerceiverRecorder:
        for attention, _ in self.resampler.blocks:
            self._handles += [
                attention.q_proj.register_forward_hook(self._keeper(attention, "q")),
                attention.k_proj.register_forward_hook(self._keeper(attention, "k")),
                attention.register_forward_hook(self._finish),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._qk = [], {}

    def _keeper(self, attention: nn.Module, name: str):
        def keep(module, args, output):
            self._qk.setdefault(attention, {})[name] = output  # (B, L or N + L, heads * head_dim)
        return keep

    def _finish(self, attention, args, output) -> None:
        kept = self._qk.pop(attention)
        q = split_heads(kept["q"], attention.head_dim)  # (B, heads, L, D)
        k = split_heads(kept["k"], attention.head_dim)  # (B, heads, N + L, D)
        if attention.qk_layer_norms:
            q, k = attention.q_layer_norm(q), attention.k_layer_norm(k)
        self.probs.append((q.float() * attention.qk_scale @ k.float().transpose(-1, -2)).softmax(-1))


@register_adapter
class IdeficsAdapter(VLMAdapter):
    """IDEFICS v1: the gated cross-attention blocks' rows over the image keys (module docstring).

    `to_image` gives per sample (heads, R, G, G) on the vision tower's patch grid; with the resampler, the
    text-to-latent rows composed with the Perceiver rollout recorded by the last `capture` of this adapter (an
    approximation, see `perceiver_rollout`). One image per sample.
    """

    family = "idefics"
    model_types = ("idefics",)
    # the decoder sits in the model itself, beside the vision tower and the Perceiver
    language_model = re.compile(r"(^|\.)model\.(embed_tokens|layers|gated_cross_attn_layers|norm)\.")
    attention_name = "cross_attn"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.rollout: torch.Tensor | None = None  # (B * images, L, G*G), from the last capture (resampler only)

    @property
    def inner(self) -> nn.Module:
        return getattr(self.model, "model", self.model)

    @property
    def grid(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def alignable_layers(self) -> list[int]:
        return cross_attention_layers(self.model.config)

    def attention_module(self, layer: int) -> nn.Module:
        if layer not in self.alignable_layers():
            raise ValueError(f"layer {layer} has no attention to align in an {self.family} model; "
                             f"alignable: {self.alignable_layers()}")
        return self.inner.gated_cross_attn_layers[layer // self.model.config.cross_layer_interval].cross_attn

    def num_heads(self, layer: int) -> int:
        return self.model.config.num_attention_heads

    @property
    def image_token_id(self) -> int:
        """`<image>`: IDEFICS keeps `<fake_token_around_image>` and `<image>`, in that order, in its additional
        vocabulary after the `vocab_size` regular tokens (a config's own `image_token_id` wins)."""
        token = getattr(self.model.config, "image_token_id", None)
        return token if token is not None else self.model.config.vocab_size + 1

    @contextmanager
    def capture(self, layers, rows=None, learned=None):
        """`VLMAdapter.capture`; with the resampler, also the Perceiver's attention, rolled out into `rollout`
        (B * images, L, G*G) for `to_image` when the forward ends."""
        with super().capture(layers, rows, learned) as captured:
            if not self.model.config.use_resampler:
                yield captured
                return
            self.rollout = None
            with PerceiverRecorder(self.inner.perceiver_resampler) as recorder:
                yield captured
            if recorder.probs:
                context = recorder.probs[0].shape[-1] - self.model.config.perceiver_config.resampler_n_latents
                self.rollout = latents_to_patches(perceiver_rollout(recorder.probs, context), self.grid)

    def learned_query_key(self, attention, q_proj, k_proj, inputs, rows):
        hidden = take_rows(inputs["hidden_states"], rows, 1).to(q_proj.weight.dtype)  # (B, R, C)
        states = inputs["key_value_states"].to(k_proj.weight.dtype)  # (B, images * keys, E)
        q = split_heads(q_proj(hidden), attention.head_dim)  # (B, H, R, D)
        k = split_heads(k_proj(states), attention.head_dim)  # (B, H, N, D)
        if attention.qk_layer_norms:
            q, k = attention.q_layer_norm(q), attention.k_layer_norm(k)
        return q, k

    @classmethod
    def image_view(cls, processor, image_size: tuple[int, int], inputs: dict) -> ImageView:
        return ImageView()  # stretched to the tower's square: the whole image on the whole plane

    def to_image(self, probs: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        """(B, heads, R, keys) -> per sample (heads, R, G, G) on the patch grid.

        Raises `ValueError` for more than one image per sample, keys of another count, and, with the resampler,
        when no Perceiver rollout of this batch was recorded (a capture of this adapter records it)."""
        images = batch["image_attention_mask"].shape[-1]
        if images != 1 or batch.get("pixel_values", torch.zeros(1, 1)).shape[1] != 1:
            raise ValueError(f"alignment supports one image per sample; this batch has {images} image slots")
        if not self.model.config.use_resampler:
            return [keys_to_patches(probs[b], self.grid) for b in range(probs.shape[0])]
        if self.rollout is None or self.rollout.shape[0] != probs.shape[0]:
            raise ValueError("to_image of a model with the Perceiver resampler needs the rollout that a capture of "
                             "this adapter records during the same batch's forward")
        if probs.shape[-1] != self.rollout.shape[1]:
            raise ValueError(f"expected {self.rollout.shape[1]} latent keys, got {probs.shape[-1]}")
        planes = probs.float() @ self.rollout[:, None]  # (B, heads, R, L) @ (B, 1, L, G*G) -> (B, heads, R, G*G)
        return [p.reshape(*p.shape[:-1], self.grid, self.grid) for p in planes]


class IdeficsChatProcessor(IdeficsProcessor):
    """IDEFICS's processor for rendered chats, as the data pipeline and generation call every processor:
    `processor(text=[chat, ...], images=[[image], ...], ...)`.

    The stock `IdeficsProcessor` writes BOS itself and appends every image after the text it is given, so an image
    would follow the answer it is about. Here each `<image>` placeholder the chat template writes becomes
    `<fake_token_around_image><image><fake_token_around_image>` (what the stock processor writes for each image) and
    takes the next image of the sample; the text is tokenized as it is (`add_special_tokens` as given, BOS being
    the template's or the tokenizer's affair), with `return_offsets_mapping` and `return_text_replacement_offsets`
    (each placeholder's `span` in the chat and `new_span` in the expanded text) as the other processors give them.
    `image_attention_mask` comes from the stock functions: a token sees the latest image before it.

    It saves itself as the stock `IdeficsProcessor`; `as_chat_processor` converts a loaded one.
    Raises `ValueError` when a sample's placeholders and images differ in number.
    """

    def __call__(self, images=None, text=None, return_offsets_mapping: bool = False,
                 return_text_replacement_offsets: bool = False, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = [[] for _ in texts]
        images = [list(i) if isinstance(i, (list, tuple)) else [i] for i in images]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(images)} lists of images")
        expanded, replacements = [], []
        for sample, sample_images in zip(texts, images):
            pieces = sample.split(IMAGE)
            if len(pieces) - 1 != len(sample_images):
                raise ValueError(f"a text has {len(pieces) - 1} {IMAGE} placeholders for {len(sample_images)} images")
            out, spans = pieces[0], []
            for i, piece in enumerate(pieces[1:]):
                start = len(IMAGE) * i + sum(len(p) for p in pieces[: i + 1])
                written = AROUND + IMAGE + AROUND
                spans.append({"span": (start, start + len(IMAGE)), "new_span": (len(out), len(out) + len(written)),
                              "replacement": written})
                out += written + piece
            expanded.append(out)
            replacements.append(spans)
        kwargs.setdefault("padding", "longest")
        encoding = self.tokenizer(expanded, return_offsets_mapping=return_offsets_mapping, return_tensors="pt",
                                  **kwargs)
        most = max(1, max(len(i) for i in images))
        pixels = torch.zeros(len(texts), most, *self.default_image_dims)  # (B, images, C, H, W)
        for b, sample_images in enumerate(images):
            if sample_images:
                pixels[b, : len(sample_images)] = self.image_processor(sample_images, return_tensors="pt")
        if any(images):
            incremental, _ = image_attention_mask_for_packed_input_ids(encoding["input_ids"], self.tokenizer, "pt")
            image_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=most)  # (B, S, images)
        else:
            image_mask = torch.zeros(*encoding["input_ids"].shape, 1, dtype=torch.long)
        data = dict(encoding, pixel_values=pixels, image_attention_mask=image_mask)
        if return_text_replacement_offsets:
            data["text_replacement_offsets"] = replacements
        return BatchFeature(data=data, tensor_type=None)

    def save_pretrained(self, save_directory, **kwargs):
        """Saved as the stock `IdeficsProcessor` (loadable by `AutoProcessor` anywhere)."""
        stock = IdeficsProcessor(self.image_processor, self.tokenizer)
        stock.chat_template = self.chat_template  # its constructor drops a `chat_template` argument
        return stock.save_pretrained(save_directory, **kwargs)


def as_chat_processor(processor):
    """An `IdeficsChatProcessor` with the parts of a stock `IdeficsProcessor`; any other processor as it is."""
    if type(processor) is not IdeficsProcessor:
        return processor
    chat = IdeficsChatProcessor(processor.image_processor, processor.tokenizer)
    # IdeficsProcessor's constructor drops a `chat_template` argument, so `from_pretrained` loses the saved template;
    # the tokenizer, saved in the same directory, reads the same `chat_template.jinja`
    chat.chat_template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    return chat
