"""Tiny seeded IDEFICS v1 models of the real class (`IdeficsForVisionText2Text`), with and without the Perceiver
resampler, their processor (the stock `IdeficsProcessor` around `IdeficsImageProcessorPil`, no torchvision) and the
testers of the shared adapter suite (`tests/test_vlm_adapters.py`'s tests, run by `tests/test_vlm_idefics.py`).

Sizes: 16-pixel images of 4-pixel patches (4 x 4 patches and CLS per image); 4 text layers with a gated
cross-attention block before layers 0 and 2 (`cross_layer_interval` 2); with the resampler, 8 latents from a 2-block
Perceiver. The vocabulary ends in IDEFICS's additional tokens `<fake_token_around_image>` and `<image>`
(`additional_vocab_size` 2), as in the released checkpoints. The chat template is IDEFICS-instruct's turn format
(`User:`, `Assistant:`, `<end_of_utterance>`), with `<image>` where the image goes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from family_testers import chat, chat_word_level, noise_image
from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor, PreTrainedTokenizerFast
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil
from vlm_testers import VLMTester

from lavender.vlm.idefics import IdeficsChatProcessor, as_chat_processor

SIZE, PATCH = 16, 4  # image pixels, patch pixels
GRID = SIZE // PATCH  # patches per side
LATENTS = 8
UNK, BOS, EOS, EOU = "<unk>", "<s>", "</s>", "<end_of_utterance>"
AROUND, IMAGE = "<fake_token_around_image>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, EOU, AROUND, IMAGE)  # the last two: IDEFICS's additional vocabulary

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>"
    "{% else %} {{ content['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the shapes world's words, roles, digits and punctuation, a newline token, then the specials.
    Spaces make no token, a newline does; text is lower-cased; the template writes BOS."""
    tok = chat_word_level({"user", "assistant", "system"}, ("\n",), SPECIAL_TOKENS, UNK)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=UNK,
                                   model_max_length=1024, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False, extra_special_tokens={"image_token": IMAGE})


def stock_processor(**image_kwargs) -> IdeficsProcessor:
    """The processor saved with the tiny models, as the released checkpoints carry it."""
    processor = IdeficsProcessor(IdeficsImageProcessorPil(image_size=SIZE, **image_kwargs), build_tokenizer())
    processor.chat_template = CHAT_TEMPLATE  # IdeficsProcessor's constructor drops a `chat_template` argument
    return processor


def chat_processor(**image_kwargs) -> IdeficsChatProcessor:
    """The stock processor as lavender loads it (`lavender.vlm.base.chat_processor`)."""
    return as_chat_processor(stock_processor(**image_kwargs))


def tiny_config(resampler: bool = False, qk_norms: bool = False) -> IdeficsConfig:
    tokenizer = build_tokenizer()
    return IdeficsConfig(
        vocab_size=len(tokenizer) - 2, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=qk_norms,
        alpha_initializer="ones",  # tanh(1): the image reaches the text from the start (released: trained gates)
        vision_config=dict(embed_dim=16, image_size=SIZE, patch_size=PATCH, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2),
        use_resampler=resampler,
        perceiver_config=dict(resampler_n_latents=LATENTS, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=16),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=1024,
    )


def tiny_idefics(attn: str, resampler: bool = False, qk_norms: bool = False) -> IdeficsForVisionText2Text:
    """A seeded random IdeficsForVisionText2Text using kernel `attn`, in eval mode."""
    config = tiny_config(resampler, qk_norms)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return IdeficsForVisionText2Text(config).eval()


# (question, answer, image height, width): the longer sample second
SAMPLES = (("what is this ?", "two .", 16, 48),
           ("how many objects are there in the picture ?", "a red circle .", 32, 24))


def idefics_inputs(padding_side: str = "left", count: int = 2, second_image: bool = False) -> dict:
    """The first `count` of `SAMPLES` through the chat processor, padded on `padding_side`; with `second_image`,
    the last sample shows a second image after the question (so the batch has two image slots, the first sample's
    second empty, and the answer of the last sees only its second image)."""
    processor = chat_processor()
    samples = SAMPLES[:count]
    texts = [processor.apply_chat_template(chat(q, a), tokenize=False) for q, a, _, _ in samples]
    images = [[noise_image(h, w, seed=i)] for i, (_, _, h, w) in enumerate(samples)]
    if second_image:
        texts[-1] = texts[-1].replace(f"{EOU}\n", f"{IMAGE}{EOU}\n", 1)
        images[-1].append(noise_image(SIZE, SIZE, seed=7))
    return dict(processor(text=texts, images=images, padding_side=padding_side))


def save_tiny_idefics(out: str | Path, resampler: bool = False) -> Path:
    """Save a seeded tiny model (SDPA) and the stock processor to `out`, loadable by `AutoModelForImageTextToText` and
    `AutoProcessor`; returns the path. (`family_testers.save_tiny` reads a text config, which IDEFICS has not.)"""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_idefics("sdpa", resampler)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(out)
    stock_processor().save_pretrained(out)
    return out


class IdeficsTester(VLMTester):
    """Gated cross-attention before layers 0 and 2 of 4, over CLS and 4 x 4 patches (or, with the resampler, 8
    latents; with per-head q/k norms); a left-padded batch of a wide image and a tall one followed by a second
    image, then the first sample alone with a second image."""

    layers = (0, 2)

    def __init__(self, resampler: bool = False):
        self.resampler = resampler
        self.id = "idefics-resampler" if resampler else "idefics"

    def build_model(self, attn):
        return tiny_idefics(attn, self.resampler, qk_norms=self.resampler)

    def batches(self):
        return [idefics_inputs(second_image=True), idefics_inputs(count=1, second_image=True)]

    @property
    def image_token_id(self):
        return build_tokenizer().convert_tokens_to_ids(IMAGE)

    def rows(self, batch):
        s = batch["input_ids"].shape[1]
        image = int((batch["input_ids"][0] == self.image_token_id).nonzero()[0])
        return torch.tensor([s - 1, s - 3, s - 6, image])  # text after the image, and `<image>` itself

    def image_key(self, batch):
        return 0 if self.resampler else 1  # a latent, or the first patch (key 0 is CLS)

    def reference(self, eager, batch):
        """The eager cross-attention's own probabilities (IDEFICS's `output_attentions` records only `self_attn`)."""
        seen, hooks = {}, []
        for layer in self.layers:
            block = eager.model.gated_cross_attn_layers[layer // eager.config.cross_layer_interval]
            hooks.append(block.cross_attn.register_forward_hook(
                lambda module, args, output, layer=layer: seen.__setitem__(layer, output[1])))
        eager(**batch)
        for hook in hooks:
            hook.remove()
        return seen

    def unseen(self, batch, rows):
        """The keys of every image slot a row may not see (`image_attention_mask` 0), for rows that see an image
        (a row that sees none attends all keys alike, as eager does)."""
        per_image = LATENTS if self.resampler else 1 + GRID * GRID
        seen = batch["image_attention_mask"][:, rows].bool()  # (B, R, images)
        unseen = ~seen & seen.any(-1, keepdim=True)
        return unseen.repeat_interleave(per_image, dim=-1)  # (B, R, images * per_image)

