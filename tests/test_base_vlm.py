"""The shapes world's base VLM: it saves, loads offline through the Auto classes, tokenizes the world word by word,
and trains."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lavender.diffusion.words import words_to_tokens
from lavender.world.base_vlm import IMAGE, BaseVLMConfig, build_base_vlm, build_tokenizer, tokenizer_words
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
