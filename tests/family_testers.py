"""What the family testers (tests/*_testers.py) and their tests (tests/test_vlm_*.py) share: word-level tokenizers,
the stage-2 chat messages and batches, noise images, patch markers and the embedding change they make, the thin
wrappers that run the shared adapter suite (tests/test_vlm_adapters.py) on a family's testers, the saved tiny model's
training step, the 640 x 480 marker through both stages, the stage-2 data checks (offsets, labels, aligned words,
collated batches), and the "attention moves toward the targets" and `lavender eval attention` checks. Helpers
only: no tests here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
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


def chat_word_level(roles: set[str], newlines: tuple[str, ...], special_tokens: tuple[str, ...], unk: str) -> Tokenizer:
    """`word_level` over the shapes world's words and `roles` (lower-cased), digits and punctuation, then the
    `newlines` (added tokens, so that a run of them is one token, the longest first) and the `special_tokens`; a
    decoder that joins words with spaces."""
    from lavender.world.base_vlm import DIGITS, PUNCTUATION, tokenizer_words

    words = sorted({w.lower() for w in tokenizer_words()} | set(roles))
    pieces = list(dict.fromkeys([*words, *DIGITS, *PUNCTUATION]))
    vocab = {t: i for i, t in enumerate([*pieces, *newlines, *special_tokens])}
    tok = word_level(vocab, unk)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in sorted(newlines, key=len, reverse=True)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def chat(question: str, answer: str) -> list[dict]:
    """One image-question-answer exchange in the message format the stage-2 trainer uses."""
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def chat_batch(processor, samples, padding_side: str = "left", **options) -> dict:
    """`samples` ((question, answer, image height, width), ...) as chats, each with a noise image (seeded by its
    index), through `processor` (with `options`), padded on `padding_side`."""
    texts = [processor.apply_chat_template(chat(q, a), tokenize=False) for q, a, _, _ in samples]
    images = [[noise_image(h, w, seed=i)] for i, (_, _, h, w) in enumerate(samples)]
    return dict(
        processor(text=texts, images=images, padding=True, padding_side=padding_side, return_tensors="pt", **options)
    )


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def marked_cells(base: Image.Image, cells: list[tuple[int, int]], patch: int) -> list[Image.Image]:
    """`base`, then one copy of it per cell (r, c) of `cells`, in order, with that `patch` x `patch` patch marked."""
    images = [base]
    for r, c in cells:
        marked = base.copy()
        marked.paste((255, 0, 255), (c * patch, r * patch, (c + 1) * patch, (r + 1) * patch))
        images.append(marked)
    return images


def marked_images(base: Image.Image, rows: int, cols: int, patch: int) -> list[Image.Image]:
    """`base`, then one copy of it per patch (r, c) of a `rows` x `cols` grid, row by row, with that patch marked."""
    return marked_cells(base, [(r, c) for r in range(rows) for c in range(cols)], patch)


def one_chat_each(processor, images: list[Image.Image], **options) -> dict:
    """`images` through `processor` (with `options`), one image and the same short chat per sample."""
    text = processor.apply_chat_template(chat("what is this ?", "a square ."), tokenize=False)
    return dict(processor(text=[text] * len(images), images=[[im] for im in images], return_tensors="pt", **options))


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


def image_token_change(model, batch, image_token_id: int, text_model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`embedding_change` (B, S), checked to be zero off the image tokens, and where the image tokens are (B, S)."""
    change = embedding_change(model, batch, text_model)
    image = batch["input_ids"] == image_token_id
    assert change[~image].max() == 0
    return change, image


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


def assert_same_weights(model, reference) -> None:
    """`model` (loaded back) holds every weight of `reference` (the tiny model it was saved from)."""
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def assert_trains(model, batch: dict, image_token_id: int, ignore_padding: bool = False) -> None:
    """A language-model loss on `batch`, its tokens as labels but the image tokens (and, with `ignore_padding`,
    the padding), is finite and its gradient reaches the LM head."""
    labels = batch["input_ids"]
    if ignore_padding:
        labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == image_token_id, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0


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


def first_tester_suite(testers: list) -> tuple:
    """The shared adapter suite in two tests, to assign to the same names in the family's test module:
    `test_rows_equal_eager_attention_and_logits_stay_exact` over every tester of `testers` and the kernels sdpa,
    eager and the user kernel (ids `{t.id}-{attn}`, or `attn` alone for one tester), and `test_the_shared_suite`,
    the other five tests of tests/test_vlm_adapters.py on the first tester (ids their names without `test_`)."""
    import test_vlm_adapters as suite

    kernels = ("sdpa", "eager", suite.USER_KERNEL)

    @pytest.mark.parametrize(
        "tester, attn",
        [pytest.param(t, attn, id=f"{t.id}-{attn}" if len(testers) > 1 else attn) for t in testers for attn in kernels],
    )
    def test_rows_equal_eager_attention_and_logits_stay_exact(tester, attn):
        suite.test_rows_equal_eager_attention_and_logits_stay_exact(tester, attn)

    @pytest.mark.parametrize(
        "check",
        [
            suite.test_per_sample_rows_equal_the_same_rows_shared,
            suite.test_bf16_rows_keep_float32_precision,
            suite.test_rows_train_q_and_k_also_checkpointed_and_through_lora,
            suite.test_learned_projections_start_equal_and_move_only_the_loss_rows,
            suite.test_kernels_without_a_readable_mask_are_refused,
        ],
        ids=lambda f: f.__name__.removeprefix("test_"),
    )
    def test_the_shared_suite(check):
        check(testers[0])

    return test_rows_equal_eager_attention_and_logits_stay_exact, test_the_shared_suite


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


def marker_through_both_stages(model, adapter, processor, target_cell, text_model=None, **options):
    """tests/test_frame.py's marker test for a family whose plane is the whole image: a 640 x 480 photo and a copy
    with the marker in `target_cell` of the part both stages describe, through `processor` (with `options`) and
    `model`; the change the marker makes to the image tokens' embeddings (those of `text_model`, see
    `embedding_change`), on `adapter`'s plane, and stage 1's map both put it in `target_cell`. Returns the plane and
    the batch, for the family's checks of their shapes."""
    from test_frame import H, W, photo

    from lavender.data.frame import common_view, frame_box

    base = photo()
    common = common_view(frame_box("full", W, H), adapter.image_view(processor, (W, H), {}))
    marked = with_marker_in_cell(base, common.image, target_cell)
    text = processor.apply_chat_template(chat("what is this ?", "a photo ."), tokenize=False)
    batch = dict(processor(text=[text] * 2, images=[[base], [marked]], return_tensors="pt", **options))
    plane = adapter.to_image(embedding_change(model, batch, text_model)[:, None, None, :], batch)[1][0, 0]
    assert_marker_in_cell(base, marked, plane, common, target_cell)
    return plane, batch


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


def map_distance(maps_store, oracle_store) -> float:
    """Mean squared difference between the VLM's min-max-normalised word maps and the oracle's."""
    from lavender.data.targets import AttentionTargets

    vlm, oracle = AttentionTargets(maps_store), AttentionTargets(oracle_store)
    errors = [float(np.mean((m - oracle[sid][w]) ** 2)) for sid in vlm for w, m in vlm[sid].items()]
    assert len(errors) > 20
    return float(np.mean(errors))


def map_correlation(store, other) -> float:
    """Mean over the words of `store` of the Pearson correlation of its map with `other`'s map of the same word."""
    from lavender.data.targets import AttentionTargets

    a, b = AttentionTargets(store), AttentionTargets(other)
    values = [np.corrcoef(m.ravel(), b[sid][w].ravel())[0, 1] for sid in a for w, m in a[sid].items()]
    return float(np.nanmean(values))


def assert_attention_moves_toward_the_targets(model, world, tmp_path, steps: int, seed: int) -> None:
    """tests/test_attention_moves.py for a family: the saved tiny `model` trained on `world` for `steps` with
    lambda = 100 against an oracle store and with lambda = 0, both with `seed`; first, the aligned run's trained
    Aligner, read on the same rows, keeps the sign of its input (the min-max normalised Aligner may learn to invert
    it, moving the attention toward the inverse of the masks: the family's test says which seeds keep it); then
    the VLM's raw attention for the aligned words (no Aligner) correlates with the masks by 0.2 more than before
    training and after plain fine-tuning, and is at least 10% closer to them than both."""
    from lavender.world.oracle import write_oracle_store

    oracle = write_oracle_store(world / "masks-train.safetensors", tmp_path / "oracle", resolution=8)

    def maps(out, **kwargs):
        return attention_maps(model, world, oracle, out, **kwargs)

    raw, final = {}, None
    for lam in (0.0, 100.0):
        out = tmp_path / f"lam{lam:g}"
        final = train_toward(model, world, oracle, out, lam, steps=steps, seed=seed)
        raw[lam] = maps(out / "maps", adapter=str(final))
    raw["before"] = maps(tmp_path / "before")
    read = maps(tmp_path / "read", adapter=str(final), aligner=True)  # the aligned run's Aligner on the same rows
    assert map_correlation(read, raw[100.0]) > 0.3, "the trained Aligner inverts its input: see the docstring"
    toward = {run: map_correlation(store, oracle) for run, store in raw.items()}
    distance = {run: map_distance(store, oracle) for run, store in raw.items()}
    assert toward[100.0] > max(toward[0.0], toward["before"]) + 0.2, toward
    assert distance[100.0] < 0.9 * distance["before"], distance
    assert distance[100.0] < 0.9 * distance[0.0], distance


def assert_eval_attention_reads(model, world, oracle, out) -> None:
    """`lavender eval attention` of `model` on the first 3 samples of `world` (batches of 2) writes finite,
    non-constant maps for each of them to `out`."""
    from lavender.cli import main
    from lavender.data.targets import AttentionTargets

    argv = ["eval", "attention", "--model", str(model), "--data", str(world), "--targets", str(oracle)]
    assert main([*argv, "--out", str(out), "--limit", "3", "--batch-size", "2"]) == 0
    maps = AttentionTargets(out)
    assert len(maps) == 3
    for sample_id in maps:
        for amap in maps[sample_id].values():
            assert np.isfinite(amap).all() and amap.max() > amap.min()


# -- stage-2 data: offsets, labels, aligned words, collated batches ---------------------------------------------------
def assert_offsets_index_the_chat(
    processor, placeholder: str, image: Image.Image, image_part: int, joined: tuple = (), **options
) -> None:
    """A rendered chat with `image` through `processor` (with `options`): the processor replaces `placeholder`, its
    offsets index the expanded text and, moved by `offsets_in_chat`, every text token spans its own text in the
    rendered chat while each of the `image_part` tokens written in place of the placeholder has an empty span at
    it. `joined`: the (token, chat text) of each token that straddles the placeholder's start (the chat's text
    before it and the processor's joined into one token), which keeps only the chat's text, up to the placeholder."""
    from lavender.train.data import offsets_in_chat

    text = processor.apply_chat_template(chat("how many squares are there ?", "two ."), tokenize=False)
    batch = processor(
        text=[text], images=[[image]], return_offsets_mapping=True, return_text_replacement_offsets=True, **options
    )
    at = text.index(placeholder)
    replacements = batch["text_replacement_offsets"][0]
    assert replacements[0]["span"] == (at, at + len(placeholder))
    offsets = offsets_in_chat(torch.tensor(batch["offset_mapping"][0]), replacements)
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    ((start, end),) = [r["new_span"] for r in replacements]
    expanded = torch.tensor(batch["offset_mapping"][0])
    inside = (expanded[:, 0] >= start) & (expanded[:, 0] < end)
    into = (expanded[:, 0] < start) & (expanded[:, 1] > start)
    assert inside.sum() == image_part
    straddling = [(token, text[s:e]) for token, (s, e), j in zip(tokens, offsets.tolist(), into.tolist()) if j]
    assert straddling == list(joined)
    for token, (s, e), i, j in zip(tokens, offsets.tolist(), inside.tolist(), into.tolist()):
        if i:
            assert s == e == at
        elif j:
            assert e == at
        else:
            assert text[s:e].lower() == token, (token, text[s:e])


def stage2_dataset(world, oracle, processor, view, image_token_id: int | None = None):
    """`world`'s training samples encoded for stage 2 by `processor` against the `oracle` store, `view` the family's
    `image_view`; the image token `image_token_id`, by default the processor's."""
    from lavender.train.data import StageTwoDataset

    return StageTwoDataset.from_paths(
        str(world),
        processor,
        processor.image_token_id if image_token_id is None else image_token_id,
        str(oracle),
        instruction="Describe the image.",
        max_length=512,
        view=view,
    )


def check_labels_and_words(dataset, tokenizer, turn_end: tuple[str, ...], samples: int = 4) -> list:
    """The first `samples` of `dataset`: the labelled tokens are exactly each answer's tokens followed by `turn_end`,
    and every sample has aligned words, each of whose rows is its own (lower-cased) token. Returns the encoded
    samples, for the family's own checks."""
    from lavender.train.data import IGNORE, conversation

    encoded = []
    for index in range(samples):
        sample, enc = dataset.samples[index], dataset[index]
        ids, labels = enc.inputs["input_ids"][0], enc.inputs["labels"][0]
        labelled = tokenizer.convert_ids_to_tokens(ids[labels != IGNORE])
        answers = [
            t
            for role, text in conversation(sample, dataset.instruction)
            if role == "assistant"
            for t in [*tokenizer.tokenize(text), *turn_end]
        ]
        assert labelled == answers, (labelled, answers)
        assert enc.words
        for word in enc.words:
            assert [tokenizer.convert_ids_to_tokens(int(ids[r])) for r in word.rows] == [word.word.lower()]
        encoded.append(enc)
    return encoded


def check_decoded_labels_and_words(processor, world, tmp_path, view, turn_end: str) -> None:
    """The first 3 training samples of `world`, encoded for stage 2 by `processor` against an oracle store: the
    labels decode to the answers, each followed by `turn_end`; no image token is labelled; a square image fills its
    plane; every aligned word's rows decode to the word, its target is the store's, and the aligned words are the
    caption's words the store has."""
    from lavender.data.samples import read_samples
    from lavender.data.targets import AttentionTargets
    from lavender.train.data import IGNORE, StageTwoDataset
    from lavender.world.oracle import write_oracle_store

    samples = read_samples(world / "train.json")[:3]
    store = AttentionTargets(write_oracle_store(world / "masks-train.safetensors", tmp_path / "oracle"))
    data = StageTwoDataset(
        samples,
        processor,
        processor.image_token_id,
        store,
        instruction="Describe the image.",
        max_length=512,
        view=view,
    )
    tok = processor.tokenizer
    for i, sample in enumerate(samples):
        enc = data[i]
        ids, labels = enc.inputs["input_ids"][0], enc.inputs["labels"][0]
        replies = [t for role, t in sample.turns if role == "assistant"]
        expected = [w for r in replies for w in [*tok.decode(tok(r)["input_ids"]).split(), turn_end]]
        assert tok.decode(ids[labels != IGNORE]).split() == expected
        assert (labels[ids == processor.image_token_id] == IGNORE).all()
        assert enc.words and enc.view.in_plane == (0.0, 0.0, 1.0, 1.0)  # a square image fills its plane
        for word in enc.words:  # each word's rows are its own tokens
            assert tok.decode(ids[list(word.rows)]) == word.word
            torch.testing.assert_close(word.target, torch.as_tensor(store[sample.id][word.word]))
        assert {w.word for w in enc.words} == set(sample.caption.split()) & set(store.words(sample.id))


def colour_question_dataset(processor, images: list[Image.Image], out: Path):
    """`images` saved to `out` as samples "0", "1", ..., each asked "what colour is the square ?" and answering
    "green .", encoded for stage 2 by `processor` without targets."""
    import json

    from lavender.data.samples import read_samples
    from lavender.train.data import StageTwoDataset

    records = []
    for i, image in enumerate(images):
        image.save(out / f"{i}.png")
        conversations = [
            {"from": "human", "value": "<image>\nwhat colour is the square ?"},
            {"from": "gpt", "value": "green ."},
        ]
        records.append({"id": str(i), "image": f"{i}.png", "conversations": conversations})
    (out / "data.json").write_text(json.dumps(records))
    return StageTwoDataset(
        read_samples(out / "data.json"),
        processor,
        processor.image_token_id,
        None,
        instruction="Describe the image.",
        max_length=512,
    )


def collated_rows(model, processor, encoded: list) -> tuple[dict, list[torch.Tensor]]:
    """`encoded` samples collated as `lavender train` collates them: each sample's logits in the batch equal its
    own forward's. Returns the collated inputs (no labels) and the planes `to_image` gives the rows of layer 1 at
    each sample's last token."""
    from lavender.train.data import Collator
    from lavender.vlm.base import adapter_for

    adapter = adapter_for(model)
    batch = Collator.for_processor(processor)(encoded)
    inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
    rows = torch.tensor([e.inputs["input_ids"].shape[1] - 1 for e in encoded])[:, None]  # each sample's last token
    with torch.no_grad(), adapter.capture([1], rows) as captured:
        logits = model(**inputs).logits
    planes = adapter.to_image(captured[1], inputs)
    for b, e in enumerate(encoded):
        n = e.inputs["input_ids"].shape[1]
        with torch.no_grad():
            alone = model(**{k: v for k, v in e.inputs.items() if k != "labels"}).logits[0]
        torch.testing.assert_close(logits[b, :n], alone, atol=1e-5, rtol=1e-5)
    return inputs, planes
