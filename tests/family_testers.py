"""What the family testers (tests/*_testers.py) and their tests (tests/test_vlm_*.py) share: word-level tokenizers,
the stage-2 chat messages, noise images, patch markers and the embedding change they make, the thin wrappers that
run the shared adapter suite (tests/test_vlm_adapters.py) on a family's testers, the 640 x 480 marker through both
stages, and the training runs of the "attention moves toward the targets" tests. Helpers only: no tests here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel


# -- tokenizers, messages, images ------------------------------------------------------------------------------------
def word_level(vocab: dict[str, int], unk: str) -> Tokenizer:
    """A lower-casing word-level tokenizer over `vocab`: whitespace makes no token, punctuation and each digit do."""
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return tok


def chat(question: str, answer: str) -> list[dict]:
    """One image-question-answer exchange in the message format the stage-2 trainer uses."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def marked_images(base: Image.Image, rows: int, cols: int, patch: int) -> list[Image.Image]:
    """`base`, then one copy of it per patch (r, c) of a `rows` x `cols` grid, row by row, with that patch marked."""
    images = [base]
    for r in range(rows):
        for c in range(cols):
            marked = base.copy()
            marked.paste((255, 0, 255), (c * patch, r * patch, (c + 1) * patch, (r + 1) * patch))
            images.append(marked)
    return images


def embedding_change(model, batch, text_model=None) -> torch.Tensor:
    """(B, S): how far each position's input embedding to the text model (default `model.model.language_model`)
    moved from sample 0's."""
    seen = {}
    text_model = text_model if text_model is not None else model.model.language_model
    hook = text_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return (seen["embeds"] - seen["embeds"][:1]).abs().amax(-1)


def save_tiny(model, processor, out: str | Path) -> Path:
    """Save a seeded tiny `model` (its generation config ending and padding as its text config does) and its
    `processor` to `out`, loadable by `AutoModelForImageTextToText` and `AutoProcessor` `.from_pretrained(out)`;
    returns the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = model.config.text_config.eos_token_id, model.config.text_config.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# -- the shared adapter suite on a family's testers ------------------------------------------------------------------
def adapter_suite(testers: list) -> tuple:
    """The six tests of tests/test_vlm_adapters.py that take a tester, parametrized over `testers` (ids `t.id`;
    the first also over the kernels sdpa, eager and the user kernel), in the order of that module. Assign them to
    the same names in the family's test module so that pytest collects them there."""
    import test_vlm_adapters as suite

    by_type = pytest.mark.parametrize("tester", testers, ids=lambda t: t.id)

    @pytest.mark.parametrize(
        "tester, attn",
        [
            *(pytest.param(t, attn, id=f"{attn}-{t.id}") for t in testers for attn in ("sdpa", "eager")),
            *(pytest.param(t, suite.USER_KERNEL, id=f"{suite.USER_KERNEL}-{t.id}") for t in testers),
        ],
    )
    def test_rows_equal_eager_attention_and_logits_stay_exact(tester, attn):
        suite.test_rows_equal_eager_attention_and_logits_stay_exact(tester, attn)

    @by_type
    def test_per_sample_rows_equal_the_same_rows_shared(tester):
        suite.test_per_sample_rows_equal_the_same_rows_shared(tester)

    @by_type
    def test_bf16_rows_keep_float32_precision(tester):
        suite.test_bf16_rows_keep_float32_precision(tester)

    @by_type
    def test_rows_train_q_and_k_also_checkpointed_and_through_lora(tester):
        suite.test_rows_train_q_and_k_also_checkpointed_and_through_lora(tester)

    @by_type
    def test_learned_projections_start_equal_and_move_only_the_loss_rows(tester):
        suite.test_learned_projections_start_equal_and_move_only_the_loss_rows(tester)

    @by_type
    def test_kernels_without_a_readable_mask_are_refused(tester):
        suite.test_kernels_without_a_readable_mask_are_refused(tester)

    return (
        test_rows_equal_eager_attention_and_logits_stay_exact,
        test_per_sample_rows_equal_the_same_rows_shared,
        test_bf16_rows_keep_float32_precision,
        test_rows_train_q_and_k_also_checkpointed_and_through_lora,
        test_learned_projections_start_equal_and_move_only_the_loss_rows,
        test_kernels_without_a_readable_mask_are_refused,
    )


# -- a marker in a 640 x 480 photo, through both stages --------------------------------------------------------------
def with_marker_in_cell(base: Image.Image, image_box, target_cell: tuple[int, int]) -> Image.Image:
    """`base` with tests/test_frame.py's marker at the centre of `target_cell` (of R x R) of `image_box`, the part
    of the image both stages describe."""
    from test_frame import R, with_marker

    from lavender.data.frame import absolute

    row, col = target_cell
    centre = absolute(((row + 0.5) / R, (col + 0.5) / R, (row + 0.5) / R, (col + 0.5) / R), image_box)
    return with_marker(base, (centre[1], centre[0]), side=40)


def assert_marker_in_cell(base: Image.Image, marked: Image.Image, plane, common, target_cell) -> None:
    """Stage 1's map of the marker and the VLM's `plane`, each cut to `common` and resampled to R x R, put it in
    `target_cell`."""
    from test_frame import R, cell, stage1_map

    from lavender.data.frame import resample

    assert cell(resample(stage1_map(base, marked), common.in_target, R)) == target_cell
    assert cell(resample(plane, common.in_plane, R)) == target_cell


# -- the "attention moves toward the targets" runs -------------------------------------------------------------------
def train_toward(model, world, oracle, out, lam: float, steps: int, **kwargs):
    """`lavender train` of the saved tiny `model` on `world` against the `oracle` store, with `lam`, for `steps`
    (batches of 4, constant lr 3e-3, mean-mean, no dropout nor clipping); `kwargs` go to `TrainConfig` (`seed`).
    Returns the trained adapter's directory."""
    from lavender.train.config import TrainConfig
    from lavender.train.trainer import train

    return train(
        TrainConfig(
            model=str(model),
            data=str(world),
            targets=str(oracle),
            out=str(out),
            lam=lam,
            steps=steps,
            batch_size=4,
            lr=3e-3,
            aligner_lr=3e-3,
            schedule="constant",
            aggregation="mean-mean",
            lora_dropout=0.0,
            max_grad_norm=0.0,
            report_to="none",
            **kwargs,
        )
    )


def attention_maps(model, world, oracle, out, **kwargs):
    """`lavender eval attention`'s mean-mean maps of `model` on `world`'s train split; `kwargs` go to
    `AttentionMapsConfig` (`adapter`, `aligner`)."""
    from lavender.eval.attention import AttentionMapsConfig, write_attention_store

    return write_attention_store(
        AttentionMapsConfig(
            model=str(model),
            data=str(world / "train.json"),
            targets=str(oracle),
            out=str(out),
            aggregation="mean-mean",
            **kwargs,
        )
    )
