"""Multi-image samples: stage 1 stores each image's maps under its own key, stage 2 (LLaVA) compares a word's
attention to image k's keys with image k's map, and the other families refuse such samples per record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lavender.data.targets import INDEX_FILE, AttentionTargets
from lavender.diffusion.extract import ExtractConfig, Extractor, run_extract

PAIR = "<image>\n<image>\nCompare the images."


def _marked(base: Image.Image) -> Image.Image:
    """`base` with a magenta square over its top-left quarter."""
    marked = base.copy()
    marked.paste((255, 0, 255), (0, 0, base.width // 2, base.height // 2))
    return marked


def _pair(sample_id: str, images: list[str], caption: str) -> dict:
    return {"id": sample_id, "image": images, "caption": caption,
            "conversations": [{"from": "human", "value": PAIR}, {"from": "gpt", "value": caption}]}


# -- stage 1 ---------------------------------------------------------------------------------------------------------
def test_stage1_stores_each_image_under_its_key_and_a_bad_image_fails_the_sample(tiny_sd, tiny_world, tmp_path,
                                                                                 monkeypatch):
    first = json.loads((tiny_world / "train.json").read_text())[0]
    caption = first["conversations"][1]["value"]
    base = Image.open(tiny_world / first["image"]).convert("RGB")
    base.save(tmp_path / "base.png")
    _marked(base).save(tmp_path / "marked.png")
    records = [_pair("pair", ["base.png", "marked.png"], caption),
               {"id": "base", "image": "base.png", "caption": caption},
               {"id": "marked", "image": "marked.png", "caption": caption},
               _pair("half", ["base.png", "missing.png"], caption)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = ExtractConfig(diffusion=tiny_sd, data=str(tmp_path / "data.json"), out=str(tmp_path / "store"),
                        batch_size=4, resolution=8, inversion_steps=2, denoise_steps=2, device="cpu")
    targets = AttentionTargets(run_extract(cfg))
    assert sorted(targets) == ["base", "marked", "pair#image0", "pair#image1"]
    # each image was extracted with the sample's text as its own pair: the maps of the same image alone
    for key, alone in (("pair#image0", "base"), ("pair#image1", "marked")):
        assert set(targets[key]) == set(targets[alone]) and targets.image_size(key) == (32, 32)
        for word, m in targets[key].items():
            np.testing.assert_allclose(m, targets[alone][word], atol=2e-3)
        assert targets.ranges(key) is not None
    # and the marker makes the two images' maps differ
    first, second = targets["pair#image0"], targets["pair#image1"]
    assert max(np.abs(first[w] - second[w]).max() for w in first) > 0.05
    index = json.loads((tmp_path / "store" / INDEX_FILE).read_text())["samples"]
    assert index["pair#image0"] == index["pair#image1"]  # a sample's keys share a shard
    # a missing image fails its sample as a whole, named by the sample's id
    (failure,) = targets.failures()
    assert failure["id"] == "half" and failure["reason"].startswith("image not found")
    assert "image 1 of 2" in failure["reason"] and not {"half", "half#image0", "half#image1"} & set(targets)
    # a rerun does only what is not stored: the failed sample's images, not the pair's
    seen = []
    original = Extractor.__call__
    monkeypatch.setattr(Extractor, "__call__", lambda self, images, texts: seen.append(len(images)) or
                        original(self, images, texts))
    again = AttentionTargets(run_extract(cfg))
    assert sum(seen) == 1 and sorted(again) == sorted(targets)  # half's image 0 only, again left out
    assert [f["id"] for f in again.failures()] == ["half"]


# -- stage 2 (LLaVA) -------------------------------------------------------------------------------------------------
def _pairs(world, out, image1_only: bool = True) -> tuple:
    """Two-image records of the tiny world (image 0 another scene, image 1 the one the caption describes) and a
    store holding the oracle maps of the described scene under "<id>#image1" (with `image1_only` False, the
    distractor's maps under "#image0" too). Returns (data file, store)."""
    from lavender.data.targets import TargetsWriter, write_index, write_store_info
    from lavender.world.oracle import write_oracle_store

    records = json.loads((world / "train.json").read_text())
    oracle = AttentionTargets(write_oracle_store(world / "masks-train.safetensors", out / "oracle", resolution=8))
    pairs, writer, scenes = [], TargetsWriter(out / "pairs"), {}
    for i, rec in enumerate(records):
        other = records[(i + 1) % len(records)]
        caption = rec["conversations"][1]["value"]
        pairs.append({"id": f"pair{i}", "image": [str(world / other["image"]), str(world / rec["image"])],
                      "conversations": [
            {"from": "human", "value": "<image>\n<image>\nDescribe the second image."},
            {"from": "gpt", "value": caption}]})
        scenes[f"pair{i}#image1"] = rec["id"]
        if not image1_only:
            scenes[f"pair{i}#image0"] = other["id"]
    for key, scene in scenes.items():
        writer.add(key, oracle[scene], image_size=oracle.image_size(scene))
    writer.flush()
    write_store_info(out / "pairs", {"resolution": 8, "text": "caption", "frame": "full"}, "test")
    write_index(out / "pairs")
    (out / "pairs.json").write_text(json.dumps(pairs))
    return out / "pairs.json", out / "pairs"


def _batch(llava_dir, data, store, n: int = 2):
    from transformers import AutoProcessor

    from lavender.data.samples import read_samples
    from lavender.train.data import Collator, StageTwoDataset

    processor = AutoProcessor.from_pretrained(llava_dir)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    dataset = StageTwoDataset(read_samples(data)[:n], processor, image_token, AttentionTargets(store),
                              instruction="Describe the image.", max_length=256, several_images=True)
    return Collator.for_processor(processor)([dataset[i] for i in range(n)]), image_token


def test_a_words_loss_uses_image_1s_keys_against_image_1s_map(llava_dir, tiny_world, tmp_path):
    """Only image 1 has maps: every aligned word is of image 1 with image 1's map, its Aligner input is its
    attention to image 1's G x G keys, and the loss's gradient reaches the attention to image 1's keys only."""
    import torch
    from transformers import AutoModelForImageTextToText

    from lavender.align.aggregate import aggregate
    from lavender.align.aligner import AlignerConfig
    from lavender.data.frame import FULL, resample
    from lavender.train.objective import build_objective

    data, store = _pairs(tiny_world, tmp_path)
    batch, image_token = _batch(llava_dir, data, store)
    assert batch.inputs["pixel_values"].shape[0] == 4  # two images per sample
    assert all(int((ids == image_token).sum()) == 32 for ids in batch.inputs["input_ids"])  # two runs of 4 x 4
    assert batch.words and {w.image for w in batch.words} == {1}
    targets = AttentionTargets(store)
    for w, b in zip(batch.words, batch.word_sample.tolist()):
        torch.testing.assert_close(w.target, torch.as_tensor(targets[f"pair{b}#image1"][w.word]))
    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    objective = build_objective(model, True, (1,), "mean-mean", AlignerConfig(resolution=8))
    alignment = objective.alignment
    with alignment.capture(batch) as captured:
        model(**{k: v for k, v in batch.inputs.items() if k != "labels"})
    probs = captured[1]  # (B, heads, rows, S)
    probs.retain_grad()
    maps, order = alignment.word_maps(captured, batch)
    # the first word's input is its attention to sample b's second run of image tokens
    first = order[0]
    b, rows = int(batch.word_sample[first]), batch.words[first].rows
    keys = (batch.inputs["input_ids"][b] == image_token).nonzero().squeeze(-1)  # (32,)
    row_attention = torch.stack([probs[b][:, alignment.row_index[b][r]] for r in rows], dim=1)  # (heads, n, S)
    image1 = row_attention[..., keys[16:]].reshape(1, *row_attention.shape[:2], 4, 4)  # (layers, heads, n, 4, 4)
    expected = aggregate(image1, torch.full((1, len(rows)), 1 / len(rows)), "mean-mean")[0]
    torch.testing.assert_close(maps[0], resample(expected, FULL, 8))  # the 4 x 4 plane at the targets' 8 x 8
    total, count = alignment.error_sum(captured, batch)
    assert count == len(batch.words)
    total.backward()
    for b in range(2):
        keys = (batch.inputs["input_ids"][b] == image_token).nonzero().squeeze(-1)
        assert probs.grad[b][..., keys[16:]].abs().sum() > 0  # image 1's keys: its words' loss
        assert probs.grad[b][..., keys[:16]].abs().sum() == 0  # image 0's keys: no map, no loss


def test_each_image_with_a_map_is_its_own_loss_term(llava_dir, tiny_world, tmp_path):
    """With maps for both images, each word counts once per image, against that image's map, in the mean."""
    import torch

    data, store = _pairs(tiny_world, tmp_path, image1_only=False)
    batch, _ = _batch(llava_dir, data, store)
    targets = AttentionTargets(store)
    by_image = {k: [(w.word, b) for w, b in zip(batch.words, batch.word_sample.tolist()) if w.image == k]
                for k in (0, 1)}
    assert by_image[0] and by_image[1]
    for w, b in zip(batch.words, batch.word_sample.tolist()):
        torch.testing.assert_close(w.target, torch.as_tensor(targets[f"pair{b}#image{w.image}"][w.word]))


def _distance(maps_store, targets_store) -> float:
    vlm, targets = AttentionTargets(maps_store), AttentionTargets(targets_store)
    errors = [float(np.mean((m - targets[key][w]) ** 2)) for key in vlm for w, m in vlm[key].items()]
    assert len(errors) > 20 and all(key.endswith("#image1") for key in vlm if vlm[key])
    return float(np.mean(errors))


def test_training_moves_the_attention_on_image_1_toward_its_map(llava_dir, tiny_world, tmp_path):
    """tests/test_attention_moves.py on two-image samples whose maps are image 1's: trained with lambda = 100, the
    VLM's raw attention of the aligned words to image 1 (`lavender eval attention`, per image key) comes closer
    to image 1's maps than before and than plain fine-tuning."""
    from family_testers import train_toward

    from lavender.eval.attention import AttentionMapsConfig, write_attention_store
    from lavender.eval.grounding import read_masks as read_grounding_masks
    from lavender.eval.grounding import store_grounding, write_masks
    from lavender.world.data import read_masks

    data, store = _pairs(tiny_world, tmp_path)

    def maps(out, **kw):
        return write_attention_store(AttentionMapsConfig(model=str(llava_dir), data=str(data), targets=str(store),
                                                         out=str(out), aggregation="mean-mean", **kw))

    distance = {"before": _distance(maps(tmp_path / "before"), store)}
    for lam in (0.0, 100.0):
        final = train_toward(llava_dir, data, store, tmp_path / f"lam{lam:g}", lam, steps=80)
        distance[lam] = _distance(maps(tmp_path / f"lam{lam:g}" / "maps", adapter=str(final)), store)
    # `eval grounding` scores the per-image store key by key, against masks given under the image keys
    scenes = [r["id"] for r in json.loads((tiny_world / "train.json").read_text())]
    masks = read_masks(tiny_world / "masks-train.safetensors")
    write_masks(tmp_path / "masks.safetensors", {f"pair{i}#image1": masks[s] for i, s in enumerate(scenes)})
    scores = store_grounding(AttentionTargets(tmp_path / "lam100" / "maps"),
                             read_grounding_masks(tmp_path / "masks.safetensors"))["all"]
    assert scores["n"] > 20 and 0 <= scores["pointing"] <= 1
    # measured (mean squared difference to image 1's maps): 0.241 before, 0.172 plain, 0.108 aligned (at 40 steps
    # plain and aligned were still within 2% of each other)
    assert distance[100.0] < 0.9 * distance["before"], distance
    assert distance[100.0] < 0.9 * distance[0.0], distance


# -- the other families refuse such samples, per record --------------------------------------------------------------
def test_other_families_refuse_multi_image_samples_per_record(tiny_world, tmp_path, caplog):
    import logging

    from lavender.train.config import TrainConfig
    from lavender.train.data import NoSamplesError
    from lavender.train.trainer import train
    from lavender.world.base_vlm import BaseVLMConfig, build_base_vlm
    from lavender.world.oracle import write_oracle_store

    model = build_base_vlm(BaseVLMConfig(out=str(tmp_path / "mllama")))
    data, _ = _pairs(tiny_world, tmp_path)
    records = json.loads((tiny_world / "train.json").read_text())
    pairs = json.loads(data.read_text())[:2]
    for rec in records:
        rec["image"] = str(tiny_world / rec["image"])
    (tmp_path / "mixed.json").write_text(json.dumps(records + pairs))
    oracle = write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle16")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        train(TrainConfig(model=str(model), data=str(tmp_path / "mixed.json"), targets=str(oracle), out=str(out),
                          steps=1, batch_size=4, report_to="none"))
    listed = {r["id"]: r["reason"] for r in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert listed == {f"pair{i}": f"several images: sample pair{i} has 2 images; the mllama adapter takes one "
                                  "image per sample" for i in (0, 1)}
    assert any("2 samples with several images left out (pair0, pair1" in r.getMessage() for r in caplog.records)
    (tmp_path / "pairs-only.json").write_text(json.dumps(pairs))
    with pytest.raises(NoSamplesError, match=r"no usable sample \(2 records refused; several images: 2\)"):
        train(TrainConfig(model=str(model), data=str(tmp_path / "pairs-only.json"), targets=str(oracle),
                          out=str(tmp_path / "run2"), steps=1, batch_size=4, report_to="none"))
