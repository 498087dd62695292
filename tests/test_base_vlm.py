"""The shapes world's base VLMs (Mllama and LLaVA): they save, load offline through the Auto classes, tokenize the
world word by word, and train; the shipped LLaVA learned from the images and stage 2 runs on it."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lavender.diffusion.words import words_to_tokens
from lavender.world.base_vlm import (
    IMAGE,
    LLAVA_IMAGE,
    BaseVLMConfig,
    PretrainConfig,
    build_base_vlm,
    build_tokenizer,
    pretrain_base_vlm,
    tokenizer_words,
)
from lavender.world.demo import shipped_llava
from lavender.world.scenes import NUMBER_WORDS, make_scene, world_vocabulary

INSTRUCTION = "Describe the image."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return build_base_vlm(BaseVLMConfig(out=str(tmp_path_factory.mktemp("base-vlm") / "vlm")))


@pytest.fixture(scope="module")
def base_vlm(saved):
    return AutoProcessor.from_pretrained(saved), AutoModelForImageTextToText.from_pretrained(saved)


def conversation(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def world_pairs(n: int, seed: int = 0) -> list[tuple[object, str, str]]:
    """(image, question, answer): the caption instruction and the questions, alternating."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        scene = make_scene(rng)
        question, answer = (INSTRUCTION, scene.caption) if i % 2 == 0 else scene.qa[0]
        pairs.append((scene.image, question, answer))
    return pairs


def training_batch(processor, pairs) -> tuple[dict, list[str]]:
    """The stage-2 trainer's call: full conversations, labels only on the answer and its end-of-turn token."""
    texts = [processor.apply_chat_template(conversation(q, a), tokenize=False) for _, q, a in pairs]
    prompts = [processor.apply_chat_template(conversation(q), tokenize=False, add_generation_prompt=True)
               for _, q, _ in pairs]
    batch = processor(text=texts, images=[[image] for image, _, _ in pairs], return_tensors="pt", padding=True,
                      return_offsets_mapping=True)
    labels = batch["input_ids"].clone()
    for i, prompt in enumerate(prompts):
        assert texts[i].startswith(prompt)
        labels[i, : len(processor.tokenizer(prompt)["input_ids"])] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return dict(batch), texts


def test_loads_offline_with_the_mllama_classes(saved, base_vlm):
    processor, model = base_vlm
    # the base name lets AutoImageProcessor pick the torchvision class where torchvision exists, PIL otherwise
    saved_config = json.loads((saved / "processor_config.json").read_text())
    assert saved_config["image_processor"]["image_processor_type"] == "MllamaImageProcessor"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in saved.iterdir()}
    assert type(processor).__name__ == "MllamaProcessor" and processor.tokenizer.is_fast
    assert type(model).__name__ == "MllamaForConditionalGeneration"
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    assert image_id == processor.image_token_id == model.config.image_token_index == len(processor.tokenizer) - 1
    text = model.config.text_config
    assert text.vocab_size == image_id  # as in Llama 3.2 Vision: <|image|> sits one past the LM head
    for token_id in (text.bos_token_id, text.pad_token_id, *text.eos_token_id):
        assert 0 <= token_id < text.vocab_size
    vision = model.config.vision_config
    assert vision.vision_output_dim == vision.hidden_size * (len(vision.intermediate_layers_indices) + 1)
    assert processor.image_processor.max_image_tiles == vision.max_num_tiles


def test_chat_template_prompt_is_a_prefix_and_renders_the_image_token(base_vlm):
    processor, _ = base_vlm
    full = processor.apply_chat_template(conversation("What colour is the circle?", "red"), tokenize=False)
    prompt = processor.apply_chat_template(conversation("What colour is the circle?"), tokenize=False,
                                           add_generation_prompt=True)
    assert full.startswith(prompt) and full.endswith("red<|eot_id|>")
    assert full.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert full.count(IMAGE) == 1 and prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    tokenizer = processor.tokenizer
    full_ids, prompt_ids = tokenizer(full)["input_ids"], tokenizer(prompt)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids.count(tokenizer.bos_token_id) == 1


def test_every_world_word_is_one_token_and_nothing_is_unknown():
    tokenizer = build_tokenizer()
    assert tokenizer.is_fast
    for word in [*world_vocabulary(), *NUMBER_WORDS, *tokenizer_words()]:
        for spelling in (word, word.capitalize()):
            assert tokenizer(spelling, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(word)]
    texts = [INSTRUCTION, "1, 2 and 3: (red)!"]
    for _, question, answer in world_pairs(40):
        texts += [question, answer]
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_offsets_map_each_world_word_to_exactly_one_token(base_vlm):
    processor, _ = base_vlm
    batch, texts = training_batch(processor, world_pairs(6))
    vocabulary = set(world_vocabulary()) | set(NUMBER_WORDS)
    for i, text in enumerate(texts):
        offsets = [tuple(o) for o in batch["offset_mapping"][i].tolist()]
        tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][i].tolist())
        after_image = text.index(IMAGE) + len(IMAGE)  # words spelled inside special tokens are no world words
        words = [w for w in words_to_tokens(text, offsets) if w.word in vocabulary and w.start >= after_image]
        assert len(words) >= 2
        for word in words:
            assert len(word.tokens) == 1 and tokens[word.tokens[0]] == word.word
            start, end = offsets[word.tokens[0]]
            assert text[start:end].lower() == word.word


def test_processor_outputs_what_mllama_needs(base_vlm):
    processor, model = base_vlm
    batch, _ = training_batch(processor, world_pairs(3))
    n, length = batch["input_ids"].shape
    tiles = model.config.vision_config.max_num_tiles
    size = model.config.vision_config.image_size
    assert batch["offset_mapping"].shape == (n, length, 2)
    assert batch["pixel_values"].shape == (n, 1, tiles, 3, size, size)
    assert batch["aspect_ratio_ids"].tolist() == [[1]] * n and batch["aspect_ratio_mask"].shape == (n, 1, tiles)
    cross = batch["cross_attention_mask"]
    assert cross.shape == (n, length, 1, tiles)
    image_at = (batch["input_ids"] == processor.image_token_id).int().argmax(dim=1)
    for i in range(n):  # text from the image token on sees the image, text before it does not
        assert cross[i, : image_at[i]].sum() == 0 and cross[i, image_at[i] :].all()


def test_a_few_adamw_steps_lower_the_loss(base_vlm):
    processor, loaded = base_vlm
    torch.manual_seed(0)
    model = copy.deepcopy(loaded).train()  # the shared fixture stays untrained
    batch, _ = training_batch(processor, world_pairs(4, seed=1))
    batch.pop("offset_mapping")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    gate = model.model.language_model.layers[1].cross_attn_attn_gate  # starts at zero, so the image is unused
    assert gate.abs().item() > 0  # until training opens it
    assert losses[-1] < 0.6 * losses[0], losses


# -- LLaVA ------------------------------------------------------------------------------------------------------
GRID = 8  # 64-pixel images of 8-pixel patches


@pytest.fixture(scope="module")
def llava_saved(tmp_path_factory):
    return build_base_vlm(BaseVLMConfig(out=str(tmp_path_factory.mktemp("llava") / "vlm"), arch="llava"))


@pytest.fixture(scope="module")
def llava(llava_saved):
    return AutoProcessor.from_pretrained(llava_saved), AutoModelForImageTextToText.from_pretrained(llava_saved)


@pytest.fixture(scope="module")
def shipped():
    return AutoProcessor.from_pretrained(shipped_llava()), AutoModelForImageTextToText.from_pretrained(shipped_llava())


def llava_dataset(processor, samples, store=None):
    from lavender.train.data import StageTwoDataset

    return StageTwoDataset(samples, processor, processor.image_token_id, store, instruction=INSTRUCTION,
                           max_length=1024)


def test_llava_round_trips_through_from_pretrained(llava_saved, llava, tmp_path):
    processor, model = llava
    assert type(processor).__name__ == "LlavaProcessor" and processor.tokenizer.is_fast
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.vision_tower).__name__ == "CLIPVisionModel"
    assert type(model.model.language_model).__name__ == "LlamaModel"
    # the base name lets AutoImageProcessor pick the torchvision class where torchvision exists, PIL otherwise
    saved_config = json.loads((llava_saved / "processor_config.json").read_text())
    assert saved_config["image_processor"]["image_processor_type"] == "CLIPImageProcessor"
    assert json.loads((llava_saved / "lavender-base-vlm.json").read_text())["arch"] == "llava"
    image_id = processor.tokenizer.convert_tokens_to_ids(LLAVA_IMAGE)
    assert processor.image_token == LLAVA_IMAGE and image_id == processor.image_token_id == model.config.image_token_id
    assert image_id == len(processor.tokenizer) - 1 == model.config.text_config.vocab_size - 1
    # the same words as the Mllama tokenizer, LLaVA's <image> added after them
    assert processor.tokenizer.get_vocab() == {**build_tokenizer().get_vocab(), LLAVA_IMAGE: image_id}
    assert model.config.vision_feature_select_strategy == "default" and model.config.vision_feature_layer == -1
    again = tmp_path / "again"
    model.save_pretrained(again)
    reloaded, info = AutoModelForImageTextToText.from_pretrained(again, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_llava_tower_has_six_clip_layers_and_the_last_one_feeds_the_projector(llava):
    """DS-VLM's low/mid/high features (layers 2, 4, 6) all exist, and with `vision_feature_layer=-1` the image
    features are layer 6's output, so language-model training reaches every layer of the tower."""
    processor, loaded = llava
    model = copy.deepcopy(loaded)
    layers = model.model.vision_tower.encoder.layers
    assert model.config.vision_config.num_hidden_layers == 6 and len(layers) == 6
    image, question, answer = world_pairs(1)[0]
    text = processor.apply_chat_template(conversation(question, answer), tokenize=False)
    batch = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        features = model.get_image_features(pixel_values=batch["pixel_values"])
    assert len(hidden) == 7 and all(h.shape == (1, 1 + GRID * GRID, 64) for h in hidden)
    features = getattr(features, "pooler_output", features)
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    expected = model.model.multi_modal_projector(hidden[6][:, 1:])  # layer 6, CLS dropped
    torch.testing.assert_close(features.reshape(expected.shape), expected)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for layer in (1, 3, 5):  # the 2nd, 4th and 6th layers: low, mid and high
        grad = layers[layer].mlp.fc2.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_the_llava_processor_expands_image_into_one_token_per_patch(llava):
    processor, model = llava
    image, question, answer = world_pairs(1)[0]
    text = processor.apply_chat_template(conversation(question, answer), tokenize=False)
    assert text.count(LLAVA_IMAGE) == 1 and IMAGE not in text
    assert text.startswith("<|begin_of_text|>USER: <image>\n") and text.endswith(f"ASSISTANT: {answer}<|eot_id|>")
    from PIL import Image

    for picture in (image, Image.new("RGB", (96, 48), "red")):  # a wide image is cropped to a square
        batch = processor(text=[text], images=[[picture]], return_tensors="pt")
        ids = batch["input_ids"][0]
        at = (ids == processor.image_token_id).nonzero().flatten()
        assert len(at) == GRID * GRID == model.config.image_seq_length
        assert at.tolist() == list(range(int(at[0]), int(at[0]) + GRID * GRID))  # one run
        assert batch["pixel_values"].shape == (1, 3, 64, 64)
        assert ids[0] == processor.tokenizer.bos_token_id and (ids == processor.tokenizer.bos_token_id).sum() == 1
    with torch.no_grad():  # the model accepts what the processor gives
        assert torch.isfinite(model(**batch).logits).all()


def test_llava_labels_are_exactly_the_answer_tokens(llava):
    """The trainer's label logic on the LLaVA chat template: every answer of a multi-turn chat and its
    end-of-turn token, nothing of the prompts, the roles or the image."""
    from lavender.data.samples import Sample
    from lavender.train.data import IGNORE, label_spans

    processor, _ = llava
    tokenizer = processor.tokenizer
    image, _, _ = world_pairs(1)[0]
    turns = [("system", "Answer with a single word."), ("user", "Describe the image."),
             ("assistant", "a red circle left of a blue square"), ("user", "How many circles are there?"),
             ("assistant", "1"), ("user", "What colour is the square?"), ("assistant", "blue")]
    sample = Sample("x", lambda: image, turns=turns)
    encoded = llava_dataset(processor, [sample])[0]
    ids, labels = encoded.inputs["input_ids"][0], encoded.inputs["labels"][0]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    expected = []
    for role, text in turns:
        if role == "assistant":
            expected += [*tokenizer(text, add_special_tokens=False)["input_ids"], eot]
    assert labels[labels != IGNORE].tolist() == expected
    assert torch.equal(ids[labels != IGNORE], labels[labels != IGNORE])
    assert (ids == processor.image_token_id).sum() == GRID * GRID
    text, spans = label_spans(processor, [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns])
    assert [text[a:b] for a, b in spans] == [" a red circle left of a blue square<|eot_id|>", " 1<|eot_id|>",
                                             " blue<|eot_id|>"]


def test_world_vlm_builds_and_pretrains_llava(tmp_path):
    """`lavender world vlm --arch llava`: the flag exists, and a tiny pretraining run gives a LLaVA that records
    its arch; a work directory holding the other architecture is refused."""
    from lavender.cli import build_parser

    args = build_parser().parse_args(["world", "vlm", "--arch", "llava", "--out", str(tmp_path / "x")])
    assert args.arch == "llava"
    cfg = PretrainConfig(out=str(tmp_path / "work"), arch="llava", scenes=4, steps=1, batch_size=2, warmup_steps=0)
    model = pretrain_base_vlm(cfg)
    assert json.loads((model / "config.json").read_text())["model_type"] == "llava"
    assert json.loads((model / "lavender-base-vlm.json").read_text())["arch"] == "llava"
    with pytest.raises(ValueError, match="holds a llava base VLM"):
        pretrain_base_vlm(PretrainConfig(out=str(tmp_path / "work"), scenes=4, steps=1, batch_size=2))
    for config in (BaseVLMConfig, PretrainConfig):
        with pytest.raises(ValueError, match="arch must be one of mllama, llava"):
            config(arch="blip")


# -- the shipped LLaVA ------------------------------------------------------------------------------------------
def test_the_shipped_llava_loads_small_with_six_vision_layers(shipped):
    processor, model = shipped
    path = shipped_llava()
    assert path.parent.name == "pretrained" and path.name == "shapes-llava"
    assert type(model).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    assert model.config.vision_config.num_hidden_layers == 6 and model.config.vision_feature_layer == -1
    assert model.config.vision_config.image_size == 64 and model.config.vision_config.patch_size == 8
    assert processor.chat_template == AutoProcessor.from_pretrained(path).chat_template and "ASSISTANT:" in (
        processor.chat_template)
    assert (path / "model.safetensors").stat().st_size < 8_000_000
    assert json.loads((path / "lavender-base-vlm.json").read_text())["arch"] == "llava"


def test_the_shipped_llava_answers_from_the_image(shipped):
    """Pretraining taught it to look: the loss of the world's answers is far lower with each scene's own image
    than with another scene's."""
    processor, model = shipped
    pairs = world_pairs(16, seed=3)
    texts = [processor.apply_chat_template(conversation(q, a), tokenize=False) for _, q, a in pairs]
    prompts = [processor.apply_chat_template(conversation(q), tokenize=False, add_generation_prompt=True)
               for _, q, _ in pairs]

    def loss(images) -> float:
        batch = processor(text=texts, images=[[i] for i in images], return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        for i, prompt in enumerate(prompts):
            labels[i, : len(processor(text=[prompt], images=[[images[i]]])["input_ids"][0])] = -100
        labels[batch["attention_mask"] == 0] = -100
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    own = [image for image, _, _ in pairs]
    assert loss(own) < 0.3 * loss(own[1:] + own[:1]), (loss(own), loss(own[1:] + own[:1]))


def test_the_llava_adapter_captures_attention_from_the_shipped_llava(shipped):
    from lavender.vlm.base import adapter_for
    from lavender.vlm.llava import LlavaAdapter

    processor, model = shipped
    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaAdapter) and adapter.alignable_layers() == list(range(5))
    pairs = world_pairs(2)
    texts = [processor.apply_chat_template(conversation(q, a), tokenize=False) for _, q, a in pairs]
    batch = dict(processor(text=texts, images=[[i] for i, _, _ in pairs], return_tensors="pt", padding=True))
    rows = torch.tensor([batch["input_ids"].shape[1] - 1, GRID * GRID + 4])
    with torch.no_grad(), adapter.capture([0, 4], rows) as captured:
        model(**batch)
    for layer in (0, 4):
        probs = captured[layer]
        assert probs.shape == (2, 4, 2, batch["input_ids"].shape[1])
        planes = adapter.to_image(probs, batch)
        assert [p.shape for p in planes] == [(4, 2, GRID, GRID)] * 2
        assert all(torch.isfinite(p).all() and p.sum() > 0 for p in planes)


@pytest.mark.parametrize("targets", ["", "oracle"])
def test_lavender_train_runs_on_the_shipped_llava(targets, tiny_world, oracle, tmp_path):
    """A short `lavender train` on a few world samples: plain fine-tuning (lambda 0) and alignment to an oracle
    store, whose words are matched to the LLaVA's rows at every step."""
    from lavender.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", str(shipped_llava()), "--data", str(tiny_world), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--lr", "1e-3", "--report-to", "none", "--lora-dropout", "0"]
    args += ["--targets", str(oracle)] if targets else ["--lam", "0"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["L_VLM"])) for r in rows)
    if targets:
        assert all(r["matched_words"] > 0 and r["L_att"] > 0 for r in rows)
    assert (out / "final" / "adapter_model.safetensors").exists()
