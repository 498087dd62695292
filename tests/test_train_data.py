"""Stage-2 encoding: labels on the assistant turns only, word rows on the right tokens, bad input counted."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_testers import save_tiny_llava

from lavender.data.samples import Sample, read_samples
from lavender.data.targets import AttentionTargets, TargetsWriter, write_index, write_store_info
from lavender.train.data import IGNORE, Collator, StageTwoDataset, chat, unexpanded_offsets
from lavender.world.oracle import write_oracle_store


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava") / "m")


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
    enc = data[0]  # the two unreadable samples are skipped for the next good one
    assert enc.events["unreadable images"] == 2
    assert [w.word for w in enc.words] == ["red", "square"]
    assert enc.events["words without a target"] == 6  # a, circle, left, of, a, blue
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
    with pytest.raises(RuntimeError, match="could not be used"):
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
