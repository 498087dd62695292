"""The shapes world's base VLM: a small random Mllama (Llama 3.2 Vision layout) with a whole-word tokenizer.

`build_base_vlm` saves an untrained `MllamaForConditionalGeneration` with its `MllamaProcessor` in the standard
layout, so `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained(dir)` load it offline. It is the
starting point of a pretraining run on the world's captions and questions, and then the VLM that stage 2
fine-tunes.

The tokenizer is word-level: every word the world writes, the instructions and the chat roles is one token
(so word matching by character offsets finds exactly one row per word), digits and punctuation are single
characters, anything else becomes `<|unk|>`. Whitespace makes no token. Special tokens follow Llama 3.2
Vision, with `<|image|>` the last id, one past the language model's vocabulary, as in the real model: the
embedding table has spare rows for it, the LM head has none, so an image token left in the labels fails
loudly here just as it would with the real model. There is no post-processor: the chat template and the
processor (for raw text) put `<|begin_of_text|>` in, so it is never doubled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from lavender.world.scenes import NUMBER_WORDS, SIZES, world_vocabulary

BOS, END_OF_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
PAD, UNK, PYTHON_TAG, IMAGE = "<|finetune_right_pad_id|>", "<|unk|>", "<|python_tag|>", "<|image|>"
SPECIAL_TOKENS = (BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOT, PYTHON_TAG, PAD, UNK)  # IMAGE comes last

# Words beyond the scenes' own: chat roles, instruction phrasings, and a few near-synonyms a prompt may use.
EXTRA_WORDS = (
    "user", "assistant", "system",
    "describe", "image", "picture", "photo", "scene", "this", "in", "caption", "write", "give", "short", "brief",
    "briefly", "answer", "question", "with", "single", "word", "words", "please", "you", "see", "do", "does",
    "which", "where", "color", "colours", "colors", "shapes", "it", "its", "to", "on", "at", "not", "any", "all",
    "each", "both", "name", "count", "list", "number", "total", "side", "top", "bottom", "middle", "centre",
    "center", "next", "object", "thing", "things", "big", "s",
)
PUNCTUATION = tuple(".,?!:;'\"-()/")
DIGITS = tuple("0123456789")

# Llama 3.2 Vision's turn layout without its system-prompt and tool parts. Every line starts with a
# whitespace-trimming tag, so the newlines here render as nothing.
CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif part['type'] == 'text' %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""


@dataclass
class BaseVLMConfig:
    out: str = field(default="shapes-vlm-base", metadata={"help": "output model directory"})
    seed: int = field(default=0, metadata={"help": "random seed for the weights"})
    image_size: int = field(default=64, metadata={"help": "tile side in pixels (the world's image size)"})
    patch_size: int = field(default=8, metadata={"help": "vision patch side; image_size / patch_size patches a side"})
    max_num_tiles: int = field(default=1, metadata={"help": "tiles per image (square images always use one)"})
    vision_width: int = field(default=64, metadata={"help": "vision encoder hidden size"})
    vision_layers: int = field(default=3, metadata={"help": "local vision encoder layers"})
    vision_global_layers: int = field(default=1, metadata={"help": "gated global vision encoder layers"})
    vision_heads: int = field(default=4, metadata={"help": "vision attention heads"})
    vision_intermediate_layers: tuple[int, ...] = field(
        default=(1,), metadata={"help": "local layers whose outputs join the final one in the image features"})
    text_width: int = field(default=128, metadata={"help": "language model hidden size"})
    text_layers: int = field(default=5, metadata={"help": "decoder layers, cross-attention layers included"})
    cross_attention_layers: tuple[int, ...] = field(
        default=(1, 3), metadata={"help": "decoder layers that cross-attend to the image"})
    text_heads: int = field(default=4, metadata={"help": "language model attention heads"})
    text_kv_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    text_mlp: int = field(default=512, metadata={"help": "language model MLP width"})
    max_positions: int = field(default=512, metadata={"help": "longest sequence the rotary embedding is meant for"})
    rope_theta: float = field(default=500000.0, metadata={"help": "rotary embedding base (Llama 3's)"})

    def __post_init__(self) -> None:
        self.vision_intermediate_layers = tuple(int(i) for i in self.vision_intermediate_layers)
        self.cross_attention_layers = tuple(int(i) for i in self.cross_attention_layers)
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if not self.cross_attention_layers or not all(0 <= i < self.text_layers for i in self.cross_attention_layers):
            raise ValueError(f"cross_attention_layers must be non-empty and within 0..{self.text_layers - 1}")
        if not all(0 <= i < self.vision_layers for i in self.vision_intermediate_layers):
            raise ValueError(f"vision_intermediate_layers must be within 0..{self.vision_layers - 1}")


def tokenizer_words() -> list[str]:
    """Every whole word of the tokenizer: the world's vocabulary, its answers and relations, instructions, roles."""
    return sorted(set(world_vocabulary()) | set(NUMBER_WORDS) | set(SIZES) | set(EXTRA_WORDS))


def build_tokenizer(words: list[str] | None = None, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over `words` (default `tokenizer_words()`) with Llama 3.2 Vision specials.

    Ids: the words, then digits and punctuation, then the special tokens, and `<|image|>` last. Text is
    lower-cased first (the world writes "What" and "what"); offsets still index the original string.
    Decoding joins tokens with single spaces, so it gives back the words, not the original spacing.
    """
    words = sorted({w.lower() for w in (words or tokenizer_words())})
    pieces = list(dict.fromkeys([*words, *DIGITS, *PUNCTUATION]))
    vocab = {t: i for i, t in enumerate([*pieces, *SPECIAL_TOKENS, IMAGE])}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    # words and numbers split apart, then every punctuation mark and every digit on its own
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no "##" pieces exist: this joins with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, IMAGE)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD, unk_token=UNK,
        model_max_length=model_max_length, chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )


def build_image_processor(cfg: BaseVLMConfig) -> MllamaImageProcessorPil:
    """Mllama's tiling image processor for `image_size` tiles; a square image fills exactly one tile."""
    return MllamaImageProcessorPil(
        size={"height": cfg.image_size, "width": cfg.image_size}, max_image_tiles=cfg.max_num_tiles,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )


def tile_grids(max_num_tiles: int) -> list[list[int]]:
    """The tile arrangements the image processor can choose, in its order of aspect-ratio ids."""
    n = max_num_tiles
    return [[a, b] for a in range(1, n + 1) for b in range(1, n + 1) if a * b <= n]


def mllama_config(cfg: BaseVLMConfig, tokenizer: PreTrainedTokenizerFast) -> MllamaConfig:
    """Mllama's config: image features are the final plus intermediate vision layers; the LM head stops before
    `<|image|>`."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    if image_id != len(tokenizer) - 1:
        raise ValueError("the tokenizer must have <|image|> as its last id")
    ids = tokenizer.convert_tokens_to_ids
    vision = dict(
        hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
        num_global_layers=cfg.vision_global_layers, attention_heads=cfg.vision_heads, image_size=cfg.image_size,
        patch_size=cfg.patch_size, max_num_tiles=cfg.max_num_tiles,
        intermediate_layers_indices=list(cfg.vision_intermediate_layers),
        vision_output_dim=cfg.vision_width * (len(cfg.vision_intermediate_layers) + 1),
        supported_aspect_ratios=tile_grids(cfg.max_num_tiles),
    )
    text = dict(
        vocab_size=image_id, hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
        cross_attention_layers=list(cfg.cross_attention_layers), max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=ids(BOS), eos_token_id=[ids(END_OF_TEXT), ids(EOT)], pad_token_id=ids(PAD),
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)


def build_processor(cfg: BaseVLMConfig, tokenizer: PreTrainedTokenizerFast | None = None) -> MllamaProcessor:
    """The processor saved with the model; the chat template goes on it so `chat_template.jinja` is written."""
    tokenizer = tokenizer or build_tokenizer(model_max_length=cfg.max_positions)
    return MllamaProcessor(image_processor=build_image_processor(cfg), tokenizer=tokenizer,
                           chat_template=CHAT_TEMPLATE)


def build_base_vlm(cfg: BaseVLMConfig) -> Path:
    """Save a seeded random Mllama with its processor to `cfg.out` (standard layout) and return the path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(cfg)
    config = mllama_config(cfg, processor.tokenizer)
    torch.manual_seed(cfg.seed)
    model = MllamaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "lavender-base-vlm.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return out


@dataclass
class PretrainConfig:
    out: str = field(default="shapes-vlm-pretrain", metadata={"help": "work directory: world data, runs"})
    model_out: str = field(default="", metadata={"help": "where the pretrained model is copied (default: out/model)"})
    scenes: int = field(default=4000, metadata={"help": "training scenes generated for pretraining"})
    world_seed: int = field(default=100, metadata={"help": "seed of the pretraining scenes"})
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "samples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (cosine schedule)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and the data order"})


def pretrain_base_vlm(cfg: PretrainConfig) -> Path:
    """Build the random base VLM and fully fine-tune it (vision side included) on the world's captions and
    questions with the stage-2 trainer at lambda = 0. Resumable: rerun the same command to continue."""
    import shutil

    from lavender.train.config import TrainConfig
    from lavender.train.trainer import train
    from lavender.world.data import WorldDataConfig, write_world

    root = Path(cfg.out)
    world = root / "world"
    if not (world / "train.json").exists():
        write_world(WorldDataConfig(out=str(world), seed=cfg.world_seed, train=cfg.scenes, test=0, ood=0))
    init = root / "init"
    if not (init / "config.json").exists():
        build_base_vlm(BaseVLMConfig(out=str(init), seed=cfg.seed))
    final = train(TrainConfig(model=str(init), data=str(world / "train.json"), out=str(root / "run"), lam=0.0,
                              lora=False, train_vision=True, train_projector=True, steps=cfg.steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                              save_every=250, report_to="none", max_length=128))
    target = Path(cfg.model_out) if cfg.model_out else root / "model"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(final, target)
    (target / "lavender_train.json").unlink(missing_ok=True)
    (target / "lavender-base-vlm.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return target
