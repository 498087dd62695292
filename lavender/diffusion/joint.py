"""Joint-attention capture for MMDiT teachers (SD3, Flux): the image-query x text-key block of the joint softmax.

An MMDiT block has no cross-attention. Text and image tokens are projected separately, put into one sequence and
attend to each other in one softmax over all keys. A word's map here is the probability that each image query
gives to the word's text keys in that joint softmax: the block (image rows, text columns) of the probabilities
the layer itself uses, not renormalised over the text keys.

Why not renormalise: most image queries give most of their mass to image keys, and how much a query reads the
text at all varies over the image. Renormalising over the text keys would give a query that hardly reads the
text (a few thousandths of its mass) as much weight as one that reads it heavily, so the maps would be led by
the distribution of near-zero remainders. Kept as the model computes it, a cell's value is the share of its
attention that actually goes to the word; the word's map is min-max normalised afterwards, like every map of
stage 1, so the overall scale does not matter.

The layer's own processor still computes the layer's output, untouched (whatever its kernel or attention
backend). When the recorder wants the call, `JointAttentionCapture` forms the image queries and all keys again,
as the family's processor forms them (a `QK` function: projections, per-head q/k norms, rotary embedding), and
computes the block in float32, a few heads at a time so that the full (queries x keys) matrix of every head is
never held at once. The cost is the recorded layers' q and k projections a second time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lavender.diffusion.capture import AttentionRecorder

# (attn, hidden_states, encoder_hidden_states or None, image_rotary_emb or None, text length) ->
#   (image queries (B, heads, N, d), text keys (B, heads, L, d), image keys (B, heads, N, d))
QK = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
CHUNK_BYTES = 1 << 28  # float32 scores held at once while the block is computed


def text_block(q_image: torch.Tensor, k_text: torch.Tensor, k_image: torch.Tensor) -> torch.Tensor:
    """Probabilities (B, heads, N, L) that image queries give to text keys in softmax(q k^T / sqrt(d)) over all
    L + N keys, computed in float32 from q (B, heads, N, d) and keys (B, heads, L, d), (B, heads, N, d)."""
    b, heads, n, d = q_image.shape
    keys = torch.cat([k_text, k_image], dim=2).float()  # (B, heads, L + N, d); the softmax ignores the order
    per_head = max(1, CHUNK_BYTES // (4 * b * n * keys.shape[2]))
    blocks = []
    for h in range(0, heads, per_head):
        scores = q_image[:, h : h + per_head].float() @ keys[:, h : h + per_head].transpose(-1, -2) * d**-0.5
        blocks.append(scores.softmax(dim=-1)[..., : k_text.shape[2]])  # (B, chunk, N, L)
    return torch.cat(blocks, dim=1)


class JointAttentionCapture:
    """Processor wrapper for a joint-attention layer: the layer's own processor computes its output; the recorder
    gets the image-query x text-key block of its softmax (`text_block`) for the calls it wants.

    `text_length` is the number of text tokens at the front of the sequence of a single-stream layer, which sees
    text and image in one `hidden_states` (Flux's single blocks); a dual-stream layer gets them as
    `encoder_hidden_states` and `hidden_states`.
    """

    def __init__(self, original, recorder: AttentionRecorder, qk: QK, text_length: int):
        self.original, self.recorder, self.qk, self.text_length = original, recorder, qk, text_length

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        """As the layer's processor, and returns what it returns. Raises ValueError for an attention mask while
        recording (the families served attend without one, and the block would not reflect it)."""
        extra = {} if image_rotary_emb is None else {"image_rotary_emb": image_rotary_emb}
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        n_text = self.text_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        n_image = hidden_states.shape[1] - (n_text if encoder_hidden_states is None else 0)
        if self.recorder.wants(n_image):
            if attention_mask is not None:
                raise ValueError("cannot record joint attention under an attention mask")
            q_image, k_text, k_image = self.qk(attn, hidden_states, encoder_hidden_states, image_rotary_emb, n_text)
            self.recorder.add(text_block(q_image, k_text, k_image))
        return out


@contextmanager
def capture_joint_attention(model: torch.nn.Module, recorder: AttentionRecorder, layers: list[str], qk: QK,
                            text_length: int) -> Iterator[list[str]]:
    """Wrap the processors of `layers` (processor keys of joint-attention layers of `model`) in
    `JointAttentionCapture`; restore them on exit. Yields the sorted keys.

    Raises ValueError, before installing anything, if `layers` is empty or names a key `model` does not have.
    """
    original = dict(model.attn_processors)
    missing = sorted(set(layers) - set(original))
    if missing or not layers:
        raise ValueError(f"no joint-attention layers to capture{': not in this model: ' if missing else ''}"
                         f"{', '.join(missing)}")
    wrapped = {k: JointAttentionCapture(p, recorder, qk, text_length) if k in layers else p
               for k, p in original.items()}
    model.set_attn_processor(wrapped)
    try:
        yield sorted(layers)
    finally:
        model.set_attn_processor(original)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, heads * d) -> (B, heads, S, d)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)

