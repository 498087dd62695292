"""The shapes world's base VLMs: a small random Mllama (Llama 3.2 Vision layout) or LLaVA, with a whole-word
tokenizer.

`build_base_vlm` saves an untrained `MllamaForConditionalGeneration` with its `MllamaProcessor` (`arch="mllama"`),
or an untrained `LlavaForConditionalGeneration` (a `CLIPVisionModel` tower, LLaVA's two-layer MLP projector, a
Llama text model) with its `LlavaProcessor` (`arch="llava"`), in the standard layout, so `AutoProcessor` /
`AutoModelForImageTextToText.from_pretrained(dir)` load it offline. It is the starting point of a pretraining run
on the world's captions and questions, and then the VLM that stage 2 fine-tunes.

The tokenizer is word-level: every word the world writes, the instructions and the chat roles is one token
(so word matching by character offsets finds exactly one row per word), digits and punctuation are single
characters, anything else becomes `<|unk|>`. Whitespace makes no token. Special tokens follow Llama 3.2
Vision, with `<|image|>` the last id, one past the language model's vocabulary, as in the real model: the
embedding table has spare rows for it, the LM head has none, so an image token left in the labels fails
loudly here just as it would with the real model. There is no post-processor: the chat template and the
processor (for raw text) put `<|begin_of_text|>` in, so it is never doubled.

The LLaVA tokenizer is the same one with LLaVA's `<image>` added after it as a special token, as LLaVA's
conversion adds it to Vicuna's tokenizer; the language model's vocabulary covers every id (its `<|image|>` is an
unused token). The processor expands each `<image>` into one token per patch, G x G = (image_size / patch_size)^2
(the CLS feature is dropped by the "default" feature strategy), and the chat template is LLaVA-1.5's
(`USER: <image>\n... ASSISTANT: ...</s>`, with this tokenizer's end-of-turn token for `</s>`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from lavender.world.scenes import NUMBER_WORDS, SIZES, world_vocabulary

BOS, END_OF_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
PAD, UNK, PYTHON_TAG, IMAGE = "<|finetune_right_pad_id|>", "<|unk|>", "<|python_tag|>", "<|image|>"
SPECIAL_TOKENS = (BOS, END_OF_TEXT, HEADER_START, HEADER_END, EOT, PYTHON_TAG, PAD, UNK)  # IMAGE comes last
LLAVA_IMAGE = "<image>"  # LLaVA's image token, added after IMAGE in the LLaVA tokenizer
ARCHS = ("mllama", "llava")

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

# LLaVA-1.5's conversation layout ("vicuna_v1"): "USER: <image>\n<question> ASSISTANT: <answer></s>", a system
# turn's text first as it is, the end-of-turn token for "</s>". The generation prompt ends at "ASSISTANT:", so a
# prompt is a prefix of the rendering with its answer (which `label_spans` needs); whitespace makes no token.
LLAVA_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] != 'system' %}
        {{- message['role'].upper() + ': ' }}
    {%- endif %}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'image' %}
                {{- '<image>\n' }}
            {%- elif part['type'] == 'text' %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- eos_token }}
    {%- else %}
        {{- ' ' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'ASSISTANT:' }}
{%- endif %}"""


@dataclass
class BaseVLMConfig:
    out: str = field(default="shapes-vlm-base", metadata={"help": "output model directory"})
    arch: str = field(default="mllama", metadata={"help": "architecture: mllama (Llama 3.2 Vision) or llava"})
    seed: int = field(default=0, metadata={"help": "random seed for the weights"})
    image_size: int = field(default=64, metadata={"help": "tile side in pixels (the world's image size)"})
    patch_size: int = field(default=8, metadata={"help": "vision patch side; image_size / patch_size patches a side"})
    max_num_tiles: int = field(default=1, metadata={"help": "mllama: tiles per image (square images use one)"})
    vision_width: int = field(default=64, metadata={"help": "vision encoder hidden size"})
    vision_layers: int = field(
        default=0, metadata={"help": "vision encoder layers (mllama: local ones); 0: 3 for mllama, 6 for llava"})
    vision_global_layers: int = field(default=1, metadata={"help": "mllama: gated global vision encoder layers"})
    vision_heads: int = field(default=4, metadata={"help": "vision attention heads"})
    vision_intermediate_layers: tuple[int, ...] = field(
        default=(1,), metadata={"help": "mllama: local layers whose outputs join the final one in the image features"})
    vision_feature_layer: int = field(
        default=-1, metadata={"help": "llava: the CLIP hidden state projected into the language model (-1: the "
                                      "last layer's output, so every layer is trained)"})
    text_width: int = field(default=128, metadata={"help": "language model hidden size"})
    text_layers: int = field(default=5, metadata={"help": "decoder layers (mllama: cross-attention layers included)"})
    cross_attention_layers: tuple[int, ...] = field(
        default=(1, 3), metadata={"help": "mllama: decoder layers that cross-attend to the image"})
    text_heads: int = field(default=4, metadata={"help": "language model attention heads"})
    text_kv_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    text_mlp: int = field(default=512, metadata={"help": "language model MLP width"})
    max_positions: int = field(default=512, metadata={"help": "longest sequence the rotary embedding is meant for"})
    rope_theta: float = field(default=500000.0, metadata={"help": "rotary embedding base (Llama 3's)"})

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        self.vision_layers = self.vision_layers or {"mllama": 3, "llava": 6}[self.arch]
        self.vision_intermediate_layers = tuple(int(i) for i in self.vision_intermediate_layers)
        self.cross_attention_layers = tuple(int(i) for i in self.cross_attention_layers)
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.arch == "llava":
            if not -self.vision_layers <= self.vision_feature_layer < 0:
                raise ValueError(f"vision_feature_layer must be within -{self.vision_layers}..-1")
            return
        if not self.cross_attention_layers or not all(0 <= i < self.text_layers for i in self.cross_attention_layers):
            raise ValueError(f"cross_attention_layers must be non-empty and within 0..{self.text_layers - 1}")
        if not all(0 <= i < self.vision_layers for i in self.vision_intermediate_layers):
            raise ValueError(f"vision_intermediate_layers must be within 0..{self.vision_layers - 1}")

    @property
    def grid(self) -> int:
        """Patches per side of the vision grid."""
        return self.image_size // self.patch_size


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


def build_llava_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """`build_tokenizer()` with LLaVA's `<image>` added as a special token (the last id) and LLaVA's chat
    template."""
    tokenizer = build_tokenizer(model_max_length=model_max_length)
    tokenizer.add_tokens([AddedToken(LLAVA_IMAGE, special=True, normalized=False)], special_tokens=True)
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def build_image_processor(cfg: BaseVLMConfig) -> MllamaImageProcessorPil | CLIPImageProcessorPil:
    """Mllama's tiling image processor for `image_size` tiles, where a square image fills exactly one tile; for
    LLaVA, CLIP's (shorter side to `image_size`, then a centred `image_size` square crop, as LLaVA-1.5's)."""
    if cfg.arch == "llava":
        return CLIPImageProcessorPil(
            size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
            image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        )
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


def llava_config(cfg: BaseVLMConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LLaVA's config: a CLIP vision tower whose `vision_feature_layer` hidden state (G*G patches, CLS dropped)
    goes through the two-layer GELU projector into a Llama text model whose vocabulary covers every token."""
    image_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE)
    if image_id != len(tokenizer) - 1:
        raise ValueError(f"the tokenizer must have {LLAVA_IMAGE} as its last id")
    ids = tokenizer.convert_tokens_to_ids
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=ids(BOS), eos_token_id=[ids(END_OF_TEXT), ids(EOT)], pad_token_id=ids(PAD),
        tie_word_embeddings=False,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                       image_seq_length=cfg.grid**2, vision_feature_layer=cfg.vision_feature_layer,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_processor(cfg: BaseVLMConfig, tokenizer: PreTrainedTokenizerFast | None = None,
                    ) -> MllamaProcessor | LlavaProcessor:
    """The processor saved with the model; the chat template goes on it so `chat_template.jinja` is written.

    LLaVA's expands each `<image>` into `(image_size / patch_size)^2` tokens: one per patch of CLIP's
    `1 + G*G` features (`num_additional_image_tokens=1`, the CLS), less the CLS that the "default" strategy drops.
    """
    if cfg.arch == "llava":
        tokenizer = tokenizer or build_llava_tokenizer(model_max_length=cfg.max_positions)
        return LlavaProcessor(image_processor=build_image_processor(cfg), tokenizer=tokenizer,
                              patch_size=cfg.patch_size, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token=LLAVA_IMAGE, chat_template=LLAVA_CHAT_TEMPLATE)
    tokenizer = tokenizer or build_tokenizer(model_max_length=cfg.max_positions)
    return MllamaProcessor(image_processor=build_image_processor(cfg), tokenizer=tokenizer,
                           chat_template=CHAT_TEMPLATE)


def build_base_vlm(cfg: BaseVLMConfig) -> Path:
    """Save a seeded random Mllama or LLaVA (`cfg.arch`) with its processor to `cfg.out` (standard layout) and
    return the path."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(cfg)
    if cfg.arch == "llava":
        config = llava_config(cfg, processor.tokenizer)
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(config)
    else:
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
    arch: str = field(default="mllama", metadata={"help": "architecture of the base VLM: mllama or llava"})
    model_out: str = field(default="", metadata={"help": "where the pretrained model is copied (default: out/model)"})
    scenes: int = field(default=4000, metadata={"help": "training scenes generated for pretraining"})
    world_seed: int = field(default=100, metadata={"help": "seed of the pretraining scenes"})
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "samples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (cosine schedule)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and the data order"})

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:  # before any scene is written
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")


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
        build_base_vlm(BaseVLMConfig(out=str(init), arch=cfg.arch, seed=cfg.seed))
    built = json.loads((init / "lavender-base-vlm.json").read_text()).get("arch", "mllama")
    if built != cfg.arch:
        raise ValueError(f"{root} holds a {built} base VLM, not a {cfg.arch} one: give another --out")
    # the same text budget for both: Mllama's image is one token, LLaVA's one per patch
    image_tokens = BaseVLMConfig(arch=cfg.arch).grid ** 2 if cfg.arch == "llava" else 1
    final = train(TrainConfig(model=str(init), data=str(world / "train.json"), out=str(root / "run"), lam=0.0,
                              lora=False, train_vision=True, train_projector=True, steps=cfg.steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                              save_every=250, report_to="none", max_length=127 + image_tokens))
    target = Path(cfg.model_out) if cfg.model_out else root / "model"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(final, target)
    (target / "lavender_train.json").unlink(missing_ok=True)
    (target / "lavender-base-vlm.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return target
