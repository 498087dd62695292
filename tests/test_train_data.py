"""Stage-2 encoding: labels on the assistant turns only, word rows on the right tokens, bad input counted."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lavender.data.samples import Sample, read_samples
from lavender.data.targets import AttentionTargets, TargetsWriter, write_index, write_store_info
from lavender.train.data import (
    IGNORE,
    NO_ANSWER,
    Collator,
    NoSamplesError,
    StageTwoDataset,
    chat,
    read_training_samples,
    reason_counts,
    unexpanded_offsets,
    valid_target,
)
from lavender.world.oracle import write_oracle_store


@pytest.fixture(scope="module")
def processor(llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_dir)


def _dataset(processor, samples, store=None, **kwargs) -> StageTwoDataset:
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    args = dict(instruction="Describe the image.", max_length=128) | kwargs
    return StageTwoDataset(samples, processor, image_token, store, **args)


def test_unexpanded_offsets_undo_each_image_run():
    # text "ab <image> cd <image> ef" with each placeholder (7 chars) expanded into 3 image tokens (id 9)
    ids = torch.tensor([1, 9, 9, 9, 2, 9, 9, 9, 3])
    expanded = torch.tensor([[0, 2], [3, 10], [10, 17], [17, 24], [25, 27], [28, 35], [35, 42], [42, 49], [50, 52]])
    back = unexpanded_offsets(ids, expanded, image_token_id=9, placeholder_chars=7)
    assert back[0].tolist() == [0, 2] and back[4].tolist() == [11, 13] and back[8].tolist() == [22, 24]


def test_labels_cover_assistant_turns_and_rows_hit_the_words(processor, tiny_world, tmp_path):
    samples = read_samples(tiny_world / "train.json")[:3]
    store = AttentionTargets(write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle"))
    data = _dataset(processor, samples, store)
    tok = processor.tokenizer
    for i, sample in enumerate(samples):
        enc = data[i]
        ids, labels = enc.inputs["input_ids"][0], enc.inputs["labels"][0]
        labelled = tok.decode(ids[labels != IGNORE])
        replies = [t for role, t in sample.turns if role == "assistant"]
        expected = [w for r in replies for w in [*tok.decode(tok(r)["input_ids"]).split(), "<|eot_id|>"]]
        assert labelled.split() == expected
        assert enc.words, "the caption's colour and shape words have oracle targets"
        for word in enc.words:  # input position: the rows are the word's own tokens
            assert tok.decode(ids[list(word.rows)]) == word.word
            torch.testing.assert_close(word.target, torch.as_tensor(store[sample.id][word.word]))
            assert all(0 < w <= 1 for w in word.weights)
        caption_words = set(sample.caption.split())
        assert {w.word for w in enc.words} == caption_words & set(store.words(sample.id))


def test_predict_position_takes_the_previous_rows(processor, tiny_world, tmp_path):
    samples = read_samples(tiny_world / "train.json")[:1]
    store = AttentionTargets(write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle"))
    own = _dataset(processor, samples, store)[0].words
    before = _dataset(processor, samples, store, position="predict")[0].words
    assert [w.word for w in own] == [w.word for w in before]
    assert [tuple(r - 1 for r in w.rows) for w in own] == [w.rows for w in before]


def _store(path, resolution, maps: dict[str, dict[str, np.ndarray]], text="caption"):
    writer = TargetsWriter(path)
    for sid, words in maps.items():
        writer.add(sid, words)
    writer.flush()
    write_store_info(path, {"resolution": resolution, "text": text}, "test")
    write_index(path)
    return AttentionTargets(path)


def test_bad_input_is_counted_not_fatal(processor, tmp_path):
    good = Image.new("RGB", (32, 32), "red")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    from lavender.data.samples import open_rgb

    samples = [Sample("missing", open_rgb(tmp_path / "nope.png"), caption="a red circle"),
               Sample("broken", open_rgb(tmp_path / "broken.png"), caption="a red circle"),
               Sample("ok", lambda: good, caption="a red circle left of a blue square"),
               Sample("unstored", lambda: good, caption="a blue square"),
               Sample("small", lambda: good, caption="a blue square")]
    store = _store(tmp_path / "s", 8, {"ok": {"red": np.ones((8, 8)), "square": np.zeros((8, 8))},
                                       "small": {"blue": np.ones((4, 4)), "square": np.ones((4, 4))}})
    data = _dataset(processor, samples, store)
    enc = data[2]
    assert [w.word for w in enc.words] == ["red", "square"]
    assert enc.events["words without a target"] == 6  # a, circle, left, of, a, blue
    replaced = [data[0], data[1], data[0], data[1]]  # the unreadable samples: others are drawn in their place
    assert {e.sample_id for e in replaced} <= {"ok", "unstored", "small"}
    assert sum(e.events["unreadable images"] for e in replaced) == 2  # each bad sample counted once
    assert data[3].events["samples without targets"] == 1 and not data[3].words
    small = data[4]  # a store map of another resolution is skipped, word by word
    assert small.events["targets of the wrong shape"] == 2 and not small.words


def test_long_samples_are_truncated_after_the_image(processor, tiny_world):
    sample = read_samples(tiny_world / "train.json")[0]
    full = _dataset(processor, [sample])[0]
    n = full.inputs["input_ids"].shape[1]
    cut = _dataset(processor, [sample], max_length=n - 5)[0]
    assert cut.events["truncated samples"] == 1
    for key in ("input_ids", "attention_mask", "labels"):
        assert cut.inputs[key].shape[1] == n - 5
        torch.testing.assert_close(cut.inputs[key], full.inputs[key][:, : n - 5])
    with pytest.raises(ValueError, match="samples too long for their image"):
        _dataset(processor, [sample], max_length=4, retries=2)[0]  # would cut the image: skipped every time


def test_collator_pads_right_and_keeps_words_per_sample(processor, tiny_world, tmp_path):
    samples = read_samples(tiny_world / "train.json")[:4]
    store = AttentionTargets(write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle"))
    data = _dataset(processor, samples, store)
    encoded = [data[i] for i in range(4)]
    batch = Collator(processor.tokenizer.pad_token_id)(encoded)
    length = max(e.inputs["input_ids"].shape[1] for e in encoded)
    assert batch.inputs["input_ids"].shape == (4, length)
    for b, e in enumerate(encoded):
        n = e.inputs["input_ids"].shape[1]
        assert torch.equal(batch.inputs["input_ids"][b, :n], e.inputs["input_ids"][0])
        assert (batch.inputs["labels"][b, n:] == IGNORE).all() and (batch.inputs["attention_mask"][b, n:] == 0).all()
    assert batch.word_sample.tolist() == [b for b, e in enumerate(encoded) for _ in e.words]
    assert batch.label_tokens == sum(int((e.inputs["labels"][0, 1:] != IGNORE).sum()) for e in encoded)
    assert isinstance(batch.events, Counter)


def test_caption_only_samples_use_the_instruction(processor):
    sample = Sample("x", lambda: Image.new("RGB", (8, 8)), caption="a red circle")
    messages = chat(sample, "Describe the image.")
    assert json.dumps(messages).count('"image"') == 1
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"][0]["text"] == "a red circle"


def test_an_answer_is_matched_in_its_own_turn_and_whole_words_only(processor, tmp_path):
    sample = Sample("qa", lambda: Image.new("RGB", (32, 32)), question="is the red circle reddish? red",
                    answer="red", turns=[("user", "is the red circle reddish? red"), ("assistant", "red")])
    store = _store(tmp_path / "s", 8, {"qa": {"red": np.ones((8, 8)), "circle": np.ones((8, 8))}},
                   text="question+answer")
    enc = _dataset(processor, [sample], store)[0]
    labels = enc.inputs["labels"][0]
    answer_rows = [w.rows for w in enc.words if w.word == "red"][-1]
    assert all(labels[r] != IGNORE for r in answer_rows)  # the answer's "red", not the question's
    assert [w.word for w in enc.words] == ["red", "circle", "red", "red"]


def test_a_sample_the_processor_rejects_is_skipped(processor, tmp_path, monkeypatch):
    samples = [Sample(str(i), lambda: Image.new("RGB", (32, 32)), caption="a red circle") for i in range(2)]
    data = _dataset(processor, samples)
    real = data.encode
    monkeypatch.setattr(data, "encode", lambda s, im: (_ for _ in ()).throw(ValueError("bad tiles")) if s.id == "0"
                        else real(s, im))
    enc = data[0]
    assert enc.sample_id == "1" and enc.events["samples the processor rejected"] == 1


# -- guards: nothing to answer, answers cut off, system turns, invalid maps, refused records, coverage ----------
def _red(size: int = 32):
    return lambda: Image.new("RGB", (size, size), "red")


def test_samples_without_an_answer_are_refused_not_encoded(processor):
    samples = [Sample("caption-less", _red()),
               Sample("empty-turn", _red(), turns=[("user", "Describe the image."), ("assistant", "")]),
               Sample("image-tag-only", _red(), turns=[("user", "Describe it."), ("assistant", "<image> ")]),
               Sample("ok", _red(), caption="a red circle")]
    data = _dataset(processor, samples)
    assert [s.id for s in data.samples] == ["ok"]
    assert [(r.id, r.reason) for r in data.refused] == [(i, NO_ANSWER) for i in
                                                        ("caption-less", "empty-turn", "image-tag-only")]
    assert data.events["samples without an answer"] == 3
    assert data[0].sample_id == "ok"


def test_an_empty_turn_among_answers_gets_no_labels(processor):
    sample = Sample("multi", _red(), turns=[("user", "Describe the image."), ("assistant", ""),
                                            ("user", "What colour?"), ("assistant", "red")])
    enc = _dataset(processor, [sample])[0]
    labels = enc.inputs["labels"][0]
    # the empty turn's end-of-turn mark is not taught, only the real answer with its own
    assert processor.tokenizer.decode(labels[labels != IGNORE]).split() == ["red", "<|eot_id|>"]


def test_an_answer_cut_off_by_max_length_is_skipped(processor):
    sample = Sample("long", _red(), caption="a red circle left of a blue square")
    full = _dataset(processor, [sample])[0].inputs
    first_label = int((full["labels"][0] != IGNORE).nonzero()[0])
    data = _dataset(processor, [sample], max_length=first_label)  # keeps the image, cuts every answer token
    enc = data.encode(sample, sample.load_image())
    assert not enc.inputs
    assert enc.events["samples whose answer was cut off"] == 1 and enc.events["truncated samples"] == 1
    with pytest.raises(ValueError, match="answer was cut off"):
        data[0]
    kept = _dataset(processor, [sample], max_length=first_label + 1)[0]  # one answer token left: trained on
    assert int((kept.inputs["labels"] != IGNORE).sum()) == 1


def test_system_turns_come_first_and_the_image_in_the_first_user_turn(processor):
    sample = Sample("sys", _red(), question="What colour?", answer="red",
                    turns=[("system", "Answer in one word."), ("user", "What colour?"), ("assistant", "red")])
    messages = chat(sample, "Describe the image.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == [{"type": "text", "text": "Answer in one word."}]
    assert [c["type"] for c in messages[1]["content"]] == ["image", "text"]
    enc = _dataset(processor, [sample])[0]
    ids, labels = enc.inputs["input_ids"][0], enc.inputs["labels"][0]
    assert processor.tokenizer.decode(ids).startswith("system : answer in one word . user : <|image|>")
    assert processor.tokenizer.decode(labels[labels != IGNORE]).split() == ["red", "<|eot_id|>"]


def test_invalid_maps_are_skipped_and_counted_like_missing_ones(processor, tmp_path):
    nearly = np.zeros((8, 8))
    nearly[0, 0] = -4e-4  # storage rounding around a min-max normalised map is tolerated
    bad = {"red": np.full((8, 8), np.nan), "circle": np.full((8, 8), np.inf), "left": np.full((8, 8), 5.0),
           "blue": np.full((8, 8), -0.5)}
    store = _store(tmp_path / "s", 8, {"x": {**bad, "square": nearly}})
    sample = Sample("x", _red(), caption="a red circle left of a blue square")
    enc = _dataset(processor, [sample], store)[0]
    assert [w.word for w in enc.words] == ["square"]
    assert enc.events["invalid targets"] == 4
    assert enc.events["words without a target"] == 3  # a, of, a: the four invalid ones are counted as such
    assert valid_target(np.linspace(0, 1, 64).reshape(8, 8)) and not valid_target(np.full((8, 8), 1.01))


def _write_records(path, records, images: dict[str, str]) -> str:
    for name, colour in images.items():
        Image.new("RGB", (32, 32), colour).save(path.parent / name)
    path.write_text(json.dumps(records))
    return str(path)


def _record(sample_id, answer="a red circle", **extra):
    return {"id": sample_id, "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": answer}]} | extra


def test_refused_records_are_named_with_their_reason(processor, tmp_path):
    two_images = _record("two", images=["red.png", "red.png"])
    del two_images["image"]
    records = [_record("ok"), _record("empty", answer=""), {"id": "no-image", "conversations": []}, two_images,
               _record("ok", answer="a second record with this id")]
    data = _write_records(tmp_path / "d.json", records, {"red.png": "red"})
    samples, refused = read_training_samples(data)
    assert [s.id for s in samples] == ["ok"]
    reasons = {r.id: r.reason for r in refused}
    assert set(reasons) == {"empty", "no-image", "two", "ok"} and reasons["empty"] == NO_ANSWER
    assert all(r.reason for r in refused)
    counts = reason_counts(refused)
    assert sum(counts.values()) == 4 and counts["no answer"] == 1
    dataset = StageTwoDataset.from_paths(data, processor, 0, instruction="Describe.", max_length=128)
    assert [r.id for r in dataset.refused] == [r.id for r in refused]

    nothing = _write_records(tmp_path / "bad.json", records[1:4], {})
    with pytest.raises(NoSamplesError, match=r"no usable sample \(3 records refused; .*no answer: 1"):
        StageTwoDataset.from_paths(nothing, processor, 0, instruction="Describe.", max_length=128)


def test_coverage_counts_ids_and_the_words_of_a_probe(processor, tmp_path):
    samples = [Sample(str(i), _red(), caption="a red circle") for i in range(6)]
    maps = {"red": np.ones((8, 8)), "circle": np.ones((8, 8)), "zebra": np.ones((8, 8))}
    store = _store(tmp_path / "s", 8, {"0": maps, "3": maps, "elsewhere": maps})
    coverage = _dataset(processor, samples, store).coverage(probe=1)
    assert (coverage.samples, coverage.with_targets, coverage.probed) == (6, 2, 1)
    assert (coverage.target_words, coverage.matched_words) == (3, 2)  # "zebra" is not in the caption
    assert "2/6 training samples (33%) have targets" in str(coverage)
    full = _dataset(processor, samples, store).coverage()
    assert (full.probed, full.target_words, full.matched_words) == (2, 6, 4)


def test_targets_are_compared_on_the_part_of_the_image_the_vlm_sees(processor, tmp_path):
    """A 48 x 32 image through LLaVA's CLIP processor, which centre-crops the middle 32 x 32: the target of a
    whole-image store is cut to its middle two thirds (and renormalised), the batch says which part of the plane
    and of the image that is, and a centre-square store's target is used as it is. A store whose frame misses
    what the VLM sees is counted, never compared."""
    from lavender.data.frame import FULL, ImageView, resample
    from lavender.utils.maps import min_max
    from lavender.vlm.llava import LlavaAdapter

    Image.new("RGB", (48, 32), (200, 40, 40)).save(tmp_path / "wide.png")
    (tmp_path / "d.json").write_text(json.dumps([{"id": "w", "image": "wide.png", "caption": "a red square"}]))
    samples = read_samples(tmp_path / "d.json")
    target = np.zeros((6, 6), np.float32)
    target[1, 4] = 1.0  # right of the middle
    target[5, 0] = 0.5  # in the left sixth, which the crop drops

    def store(frame: str):
        root = tmp_path / frame
        writer = TargetsWriter(root)
        writer.add("w", {"red": target, "square": target}, image_size=(48, 32))
        writer.flush()
        write_store_info(root, {"resolution": 6, "text": "caption", "frame": frame}, "test")
        write_index(root)
        return AttentionTargets(root)

    data = _dataset(processor, samples, store("full"), view=LlavaAdapter.image_view)
    enc = data[0]
    assert enc.view.image == pytest.approx((0.0, 1 / 6, 1.0, 5 / 6))
    assert enc.view.in_target == pytest.approx((0.0, 1 / 6, 1.0, 5 / 6)) and enc.view.in_plane == FULL
    expected = min_max(resample(torch.from_numpy(target), enc.view.in_target, 6)[None])[0]
    red = next(w for w in enc.words if w.word == "red")
    torch.testing.assert_close(red.target, expected)
    assert red.target[:, 0].max() < 0.5 and int(red.target.argmax()) // 6 == 1  # the dropped sixth is gone
    batch = Collator.for_processor(processor)([enc, enc])
    assert batch.plane_boxes == [FULL, FULL] and batch.image_boxes == [enc.view.image] * 2

    square = _dataset(processor, samples, store("center-square"), view=LlavaAdapter.image_view)[0]
    assert square.view.in_target == pytest.approx(FULL)  # the crop is exactly the centre square
    torch.testing.assert_close(next(w for w in square.words if w.word == "red").target, torch.from_numpy(target))

    def top_band(processor, size, inputs):  # a made-up family that shows only the image's top quarter
        return ImageView(plane=FULL, image=(0.0, 0.0, 0.25, 1.0))

    far = store("center-square")
    missed = _dataset(processor, samples, far, view=lambda p, s, i: ImageView(image=(0.0, 0.0, 1.0, 0.1)))[0]
    assert missed.words == [] and missed.events["targets outside the VLM's view"] == 1
    band = _dataset(processor, samples, store("full"), view=top_band)[0]
    assert band.view.in_target == pytest.approx((0.0, 0.0, 0.25, 1.0))


@pytest.mark.parametrize("spelling", ["llava", "role-content", "typed-parts", "messages-jsonl"])
def test_every_conversation_spelling_gives_the_llava_labels(processor, tmp_path, spelling):
    """The same two-turn conversation written in each accepted spelling encodes to the same input ids and labels."""
    Image.new("RGB", (40, 30), (30, 200, 40)).save(tmp_path / "g.png")
    question, answer = "what colour is the square ?", "green ."
    spelled = {
        "llava": {"id": "s", "image": "g.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]},
        "role-content": {"id": "s", "images": ["g.png"], "messages": [
            {"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}]},
        "typed-parts": {"id": "s", "images": ["g.png"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]},
    }
    spelled["messages-jsonl"] = spelled["role-content"]

    def encode(record, name):
        path = tmp_path / name
        path.write_text(json.dumps(record) + "\n" if name.endswith(".jsonl") else json.dumps([record]))
        return _dataset(processor, read_samples(path))[0]

    reference = encode(spelled["llava"], "llava.json")
    got = encode(spelled[spelling], f"{spelling}.jsonl" if spelling.endswith("jsonl") else f"{spelling}.json")
    assert (got.inputs["labels"] != IGNORE).sum() > 1
    assert torch.equal(got.inputs["input_ids"], reference.inputs["input_ids"])
    assert torch.equal(got.inputs["labels"], reference.inputs["labels"])


# -- BOS: added by the tokenizer unless the chat template wrote it (transformers' own rule) ---------------------
@pytest.fixture
def bos_processor(llava_dir):
    """The tiny LLaVA processor with a tokenizer that, like Llama's, adds BOS when asked for special tokens."""
    from tokenizers import processors
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(llava_dir)
    tok = processor.tokenizer
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return processor


@pytest.mark.parametrize("template_writes_bos", [False, True])
def test_the_sequence_starts_with_one_bos_whoever_writes_it(bos_processor, processor, tiny_world, tmp_path,
                                                            template_writes_bos):
    """A template without BOS gets it from the tokenizer (an empty span, so no label and no word), one with BOS
    gets no second one: either way the input is BOS + what a tokenizer without BOS gives, labels and rows shifted."""
    from vlm_testers import LLAVA_TEMPLATE

    tok = bos_processor.tokenizer
    bos_processor.chat_template = ("{{ bos_token }}" if template_writes_bos else "") + LLAVA_TEMPLATE
    samples = read_samples(tiny_world / "train.json")[:2]
    store = AttentionTargets(write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle"))
    for i in range(len(samples)):
        enc = _dataset(bos_processor, samples, store)[i]
        plain = _dataset(processor, samples, store)[i]  # the template without BOS, a tokenizer that adds none
        ids, labels = enc.inputs["input_ids"][0], enc.inputs["labels"][0]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert torch.equal(ids[1:], plain.inputs["input_ids"][0])
        assert labels[0] == IGNORE and torch.equal(labels[1:], plain.inputs["labels"][0])
        assert enc.words and [w.word for w in enc.words] == [w.word for w in plain.words]
        for word, before in zip(enc.words, plain.words):
            assert word.rows == tuple(r + 1 for r in before.rows)
            assert tok.decode(ids[list(word.rows)]) == word.word


@pytest.mark.parametrize("tokenizer_adds_bos", [False, True])
def test_a_processor_that_writes_bos_into_the_chat_is_refused(tokenizer_adds_bos):
    """Mllama's processor writes BOS in front of a chat that has none, which shifts every offset (labels on the
    wrong tokens) and, with a tokenizer that adds BOS too, doubles it: stopped with a clear message instead."""
    from tokenizers import processors

    from lavender.train.data import ChatTemplateError
    from lavender.world.base_vlm import CHAT_TEMPLATE, IMAGE, BaseVLMConfig, build_processor

    mllama = build_processor(BaseVLMConfig())
    tok = mllama.tokenizer
    if tokenizer_adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    data = _dataset(mllama, [Sample("x", _red(64), caption="a red circle")])
    data.image_token_id = tok.convert_tokens_to_ids(IMAGE)
    enc = data[0]  # the shapes world's template writes BOS: one BOS, labels on the answer
    assert enc.inputs["input_ids"][0, 0] == tok.bos_token_id != enc.inputs["input_ids"][0, 1]
    assert tok.decode(enc.inputs["labels"][0][enc.inputs["labels"][0] != IGNORE]) == "a red circle <|eot_id|>"
    mllama.chat_template = CHAT_TEMPLATE.replace("{{- bos_token }}", "")
    with pytest.raises(ChatTemplateError, match="bos_token"):
        data[0]


def test_a_block_of_bad_samples_neither_stops_nor_skews_the_epoch(processor, tmp_path):
    """20 unreadable samples in a row among 24: every index still yields a sample, the replacements spread over
    the good ones instead of all landing on the next one, each bad sample is counted once, and the probe before
    training says how many probed samples cannot be used and why."""
    from collections import Counter as Tally

    good = Image.new("RGB", (32, 32), "red")
    samples = [Sample(f"bad{i}", (lambda: Image.open(tmp_path / "nope.png")), caption="a red circle")
               for i in range(20)]
    samples += [Sample(f"ok{i}", lambda: good, caption="a red circle") for i in range(4)]
    data = _dataset(processor, samples, retries=64)
    drawn = [data[i] for i in range(len(samples))]
    picks = Tally(e.sample_id for e in drawn)
    assert set(picks) == {"ok0", "ok1", "ok2", "ok3"} and max(picks.values()) <= 12
    assert sum(e.events["unreadable images"] for e in drawn) == 20
    probe = _dataset(processor, samples).coverage(probe=8)
    assert probe.attempted == 8 and probe.probed < 8 and probe.failures["unreadable images"] == 8 - probe.probed
    assert "could not be used" in str(probe)


def test_only_bad_samples_give_a_clear_error(processor, tmp_path):
    from lavender.train.data import DataError

    samples = [Sample(f"bad{i}", (lambda: Image.open(tmp_path / "nope.png")), caption="a red circle")
               for i in range(5)]
    data = _dataset(processor, samples)
    with pytest.raises(DataError, match="no usable sample"):
        data[0]
    assert data.coverage().probed == 0


def test_a_conversation_without_a_user_turn_gets_the_instruction(processor):
    sample = Sample("a", lambda: Image.new("RGB", (8, 8)), turns=[("assistant", "a red circle")])
    messages = chat(sample, "Describe the image.")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"][0] == {"type": "image"}
    assert messages[0]["content"][1]["text"] == "Describe the image."
