"""Tiny offline VLMs and tokenizers built from configs, for tests and the demo: each family's
real architecture at toy size, saved as a folder that loads exactly like a real checkpoint.

Teacher and student tokenizers are trained on the spot in deliberately different styles, so a
pair of tiny models has what GenRecal is about: different vocabularies, ids and splits.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The families zoo builds (all of models.FAMILIES), each with the tokenizer style its real
# checkpoints resemble. models.py is imported lazily: it pulls in torch and transformers.
DEFAULT_STYLE = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "internvl": "qwen", "llava": "llama", "idefics3": "smol"}


# --------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class _ImageTokens:
    """A family's image special tokens, the named ones its processor reads off the tokenizer,
    and the placeholder its chat template writes for one image."""

    specials: tuple[str, ...]
    named: dict[str, str] = field(default_factory=dict)
    placeholder: str = "<image>"


_IMAGE_TOKENS = {
    "qwen2_vl": _ImageTokens(
        ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"),
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        "<|vision_start|><|image_pad|><|vision_end|>",
    ),
    "internvl": _ImageTokens(
        ("<img>", "<IMG_CONTEXT>", "</img>", "<video>"),
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        "<IMG_CONTEXT>",
    ),
    "llava": _ImageTokens(("<image>",), {"image_token": "<image>"}, "<image>\n"),
    "idefics3": _ImageTokens(
        ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"), {"image_token": "<image>"}
    ),
}
_IMAGE_TOKENS["qwen2_5_vl"] = _IMAGE_TOKENS["qwen2_vl"]

# Chat templates take messages whose content is a string or a list of {"type": "image"} and
# {"type": "text", "text": ...} parts; IMAGE is replaced by the family's placeholder.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
)
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Vicuna / LLaVA-1.5: "USER: <image>\nWhat is it? ASSISTANT: a circle</s>"; BOS comes from the tokenizer.
_VICUNA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}" + _CONTENT + " "
    "{% elif message['role'] == 'user' %}USER: " + _CONTENT + " "
    "{% else %}ASSISTANT: " + _CONTENT + "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Idefics3 / SmolVLM: "<|im_start|>User:<image>What is it?<end_of_utterance>\nAssistant: a circle<end_of_utterance>\n"
_SMOL = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['role'] == 'assistant' %} {% endif %}" + _CONTENT + "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class _Style:
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    unk: str | None
    template: str
    vocab_size: int
    add_bos: bool = False


# Vocabulary sizes are caps: on the shapes corpus (under a hundred distinct words) byte-level BPE
# saturates near 440 tokens with whole words, so "llama" and "smol" stop earlier and split words
# into different pieces than "qwen" does.
STYLES = {
    "qwen": _Style(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>", None, _CHATML, 3000
    ),
    "llama": _Style(("<unk>", "<s>", "</s>", "<pad>"), "<s>", "</s>", "<pad>", "<unk>", _VICUNA, 300, add_bos=True),
    "smol": _Style(
        ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>"),
        "<|im_start|>",
        "<end_of_utterance>",
        "<|endoftext|>",
        None,
        _SMOL,
        360,
    ),
}


def default_corpus() -> list[str]:
    """Question-answer texts of the shapes data set."""
    from genrecal_cli.world.shapes import text_corpus

    return text_corpus()


def build_tokenizer(
    family: str, style: str | None = None, *, corpus: Sequence[str] | None = None, vocab_size: int | None = None
):
    """Train a small tokenizer for `family` in `style` ("qwen", "llama" or "smol"; default: the
    family's own) and wrap it as a PreTrainedTokenizerFast with its chat template. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    _check_family(family)
    style = style or DEFAULT_STYLE[family]
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; choose one of {', '.join(STYLES)}")
    s, image = STYLES[style], _IMAGE_TOKENS[family]
    specials = list(dict.fromkeys(s.specials + image.specials))
    texts = list(corpus) if corpus is not None else default_corpus()
    cap = vocab_size or s.vocab_size

    if style == "llama":
        # SentencePiece-like: words keep a leading "▁"; characters never seen map to <unk>.
        tok = Tokenizer(models.BPE(unk_token=s.unk))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = list(string.ascii_letters + string.digits + string.punctuation + "▁\n")
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=cap, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    if s.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{s.bos} $A", pair=f"{s.bos} $A {s.bos} $B", special_tokens=[(s.bos, tok.token_to_id(s.bos))]
        )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=s.bos,
        eos_token=s.eos,
        pad_token=s.pad,
        unk_token=s.unk,
        chat_template=s.template.replace("IMAGE", image.placeholder),
        # Named tokens the processors read as tokenizer attributes (e.g. tokenizer.image_token).
        extra_special_tokens=dict(image.named),
        model_max_length=2048,
    )


# --------------------------------------------------------------------------- models


def build_tiny_vlm(
    family: str,
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_style: str | None = None,
    image_size: int = 64,
    seed: int = 0,
    tokenizer=None,
    pretrain_steps: int = 0,
    cell_positions: bool = False,
    text: dict | None = None,
) -> Path:
    """Build a tiny `family` VLM with randomly initialised weights (the model's own init, seeded),
    with `pretrain_steps` > 0 first teach its vision encoder and projector to see shapes
    scenes (pretrain_vision), and save model (safetensors) and processor into `out_dir`;
    returns `out_dir`. `text` overrides the language model's config (e.g. a real model's
    hidden_size, intermediate_size, heads, vocab_size for a random model of realistic shape: the
    tokenizer stays tiny, the embedding and head rows beyond it are simply never used)."""
    import torch
    from transformers import AutoModelForImageTextToText

    _check_family(family)
    if image_size % 16:
        raise ValueError(f"image_size {image_size} must be a multiple of 16 (patch 8, merged or shuffled 2x2)")
    tokenizer = tokenizer or build_tokenizer(family, vocab_style)
    config = _CONFIGS[family](tokenizer, hidden_size, num_layers, image_size)
    if text:
        _override_text(config, family, text)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    processor = _PROCESSORS[family](tokenizer, image_size, config)
    if pretrain_steps:
        from genrecal_cli.models import VLM

        vlm = VLM(model, processor, family, str(out_dir))
        # Scenes drawn as the shapes data set draws them (64x64); the processor resizes them to
        # image_size exactly as it will resize the training images.
        pretrain_vision(vlm, steps=pretrain_steps, seed=seed, cell_positions=cell_positions)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def _check_family(family: str) -> None:
    if family not in DEFAULT_STYLE:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(DEFAULT_STYLE)}")


def _padded_vocab(tokenizer) -> int:
    # Real checkpoints pad the embedding to a multiple of 64 (so vocab_size != len(tokenizer));
    # downstream code must cope with that, so the tiny ones do it too.
    return -(-len(tokenizer) // 64) * 64


def _override_text(config, family: str, text: dict) -> None:
    t = config.text_config
    for key, value in text.items():
        setattr(t, key, value)
    head_dim = t.hidden_size // t.num_attention_heads
    if getattr(t, "head_dim", None) is not None:
        t.head_dim = head_dim
    rope = getattr(t, "rope_parameters", None) or {}
    if "mrope_section" in rope:
        rope["mrope_section"] = _mrope(head_dim)
    if family == "qwen2_vl":  # the vision merger outputs the language model's width
        config.vision_config.hidden_size = t.hidden_size
    elif family == "qwen2_5_vl":
        config.vision_config.out_hidden_size = t.hidden_size


def _text_config(tokenizer, hidden: int, layers: int) -> dict:
    """Decoder settings shared by every family's text model."""
    return dict(
        vocab_size=_padded_vocab(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _qwen2_vl_config(tokenizer, hidden, layers, image_size):
    from transformers import Qwen2VLConfig

    head_dim = hidden // 4
    text = _text_config(tokenizer, hidden, layers)
    # M-RoPE splits each head's rotary half into (time, height, width) sections.
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope(head_dim)}
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    vision = dict(
        depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=8, spatial_merge_size=2
    )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )


def _qwen2_5_vl_config(tokenizer, hidden, layers, image_size):
    from transformers import Qwen2_5_VLConfig

    text = _text_config(tokenizer, hidden, layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope(hidden // 4)}
    image, video, start, end = _ids(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=8,
        spatial_merge_size=2,
        window_size=32,  # 2x2 merged tokens per window: block 0 windowed, block 1 full
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def _llava_config(tokenizer, hidden, layers, image_size):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    (image,) = _ids(tokenizer, "<image>")
    return LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tokenizer, hidden, layers)),
        image_token_index=image,
        image_seq_length=(image_size // 8) ** 2,
        vision_feature_select_strategy="default",  # drop CLS: one token per patch
        vision_feature_layer=-1,  # the last layer, so no vision weights go unused
    )


def _internvl_config(tokenizer, hidden, layers, image_size):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=(image_size, image_size),
        patch_size=(8, 8),
    )
    (image,) = _ids(tokenizer, "<IMG_CONTEXT>")
    return InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_config(tokenizer, hidden, layers)),
        image_token_id=image,
        image_seq_length=(image_size // 8 // 2) ** 2,
        downsample_ratio=0.5,  # pixel shuffle: 2x2 patches become one token
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _idefics3_config(tokenizer, hidden, layers, image_size):
    from transformers import Idefics3Config, LlamaConfig

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    (image,) = _ids(tokenizer, "<image>")
    return Idefics3Config(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config(tokenizer, hidden, layers)).to_dict(),
        image_token_id=image,
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )


_CONFIGS: dict[str, Callable] = {
    "qwen2_vl": _qwen2_vl_config,
    "qwen2_5_vl": _qwen2_5_vl_config,
    "llava": _llava_config,
    "internvl": _internvl_config,
    "idefics3": _idefics3_config,
}


def _qwen_processor(tokenizer, image_size, config):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # min_pixels..max_pixels bound the resized area; 64x64 is a multiple of patch x merge (16), so it stays 64x64.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=16 * 16, max_pixels=image_size * image_size, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    from genrecal_cli.models import FAMILIES

    return FAMILIES[config.model_type].processor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def _llava_processor(tokenizer, image_size, config):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=image_size)
    return LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" then drops
        chat_template=tokenizer.chat_template,
        image_token="<image>",
    )


def _internvl_processor(tokenizer, image_size, config):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    # One tile per image: no crops, so image_seq_length tokens per image.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=False, max_patches=1
    )
    from genrecal_cli.models import InternVLImageOnlyProcessor

    return InternVLImageOnlyProcessor(
        image_processor, tokenizer, image_seq_length=config.image_seq_length, chat_template=tokenizer.chat_template
    )


def _idefics3_processor(tokenizer, image_size, config):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}
    )
    seq = (image_size // 8) ** 2 // config.scale_factor**2
    return Idefics3Processor(image_processor, tokenizer, image_seq_len=seq, chat_template=tokenizer.chat_template)


_PROCESSORS: dict[str, Callable] = {
    "qwen2_vl": _qwen_processor,
    "qwen2_5_vl": _qwen_processor,
    "llava": _llava_processor,
    "internvl": _internvl_processor,
    "idefics3": _idefics3_processor,
}


# --------------------------------------------------------------------------- named tiny models

# `zoo:NAME` sources: built on first use into the cache and reused. The default pair differs in
# family, size, tokenizer and chat template, as a real teacher and student would, and its
# vision is pretrained (~98% cell accuracy, 30-40 s each on 2 CPU cores) so that training on
# shapes can use the image from the first step.
NAMED = {
    "tiny-teacher": dict(family="qwen2_vl", hidden_size=128, num_layers=4, pretrain_steps=900),
    "tiny-student": dict(family="llava", hidden_size=64, num_layers=2, pretrain_steps=900),
    **{family: dict(family=family) for family in DEFAULT_STYLE},
}
ZOO_PREFIX = "zoo:"
# Shipped trained models (package data), used as they are: the reference teacher of the demo and
# of bench/replicate.py (Qwen2-VL-style, hidden 128, 8 layers, 48x48 images; 87.3% on the shapes
# test split; how it was trained: docs/results.md section 2).
SHIPPED = {"shapes-teacher": Path(__file__).parent / "assets" / "shapes-teacher"}


def cache_dir() -> Path:
    """Where built-in models are kept: $GENRECAL_CACHE, else ~/.cache/genrecal."""
    import os

    return Path(os.environ.get("GENRECAL_CACHE", Path.home() / ".cache" / "genrecal"))


def resolve_source(source: str) -> str:
    """A `zoo:NAME` source becomes the folder of that built-in model (built if missing);
    any other source is returned unchanged."""
    if not source.startswith(ZOO_PREFIX):
        return source
    name = source[len(ZOO_PREFIX) :]
    if name in SHIPPED:
        return str(SHIPPED[name])
    if name not in NAMED:
        from ..errors import ModelLoadError

        names = [*SHIPPED, *NAMED]
        raise ModelLoadError(f"unknown built-in model {source!r}; choose one of {', '.join(ZOO_PREFIX + n for n in names)}")
    # The folder name carries a digest of how the model is built, so a cache filled by an older
    # genrecal (another size, no vision pretraining) is never mistaken for the current model.
    target = cache_dir() / "zoo" / f"{name}-{_build_digest(NAMED[name])}"
    if not (target / "config.json").exists():
        _build_atomically(target, NAMED[name])
    return str(target)


BUILD_VERSION = 2  # bump when the tokenizers, configs or pretraining of the zoo change


def _build_digest(spec: dict) -> str:
    import hashlib
    import json

    blob = json.dumps({"version": BUILD_VERSION, **spec}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _build_atomically(target: Path, spec: dict) -> None:
    # Build into a private temporary folder and rename it into place, so that an interrupted
    # build or a second process building at the same time never leaves a half-written model.
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_vlm(spec["family"], tmp, **{k: v for k, v in spec.items() if k != "family"})
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- vision pretraining

# With a random vision tower and projector, a tiny VLM trained from scratch ignored the image
# for 600-1300 steps (a prototype): the features it received told images apart poorly. A short
# auxiliary task, reading each grid cell's content off the features the language model
# receives, teaches the tiny models to see first.


def cell_labels(scene) -> list[int]:
    """The class of each of the 9 grid cells (row-major): 0 empty, else 1 + colour * 3 + shape."""
    from genrecal_cli.world.shapes import COLOURS, GRID, SHAPES

    labels = [0] * GRID * GRID
    for o in scene:
        labels[o.cell] = 1 + list(COLOURS).index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)
    return labels


def image_features(vlm, images):
    """Projected features of PIL `images`, [B, T, H]: what the language model receives at the
    image-token positions, from the family's own image processor and image-feature path."""
    import torch

    # One image per sample, as in training (Idefics3 reads a flat list as one sample's images).
    pixels = vlm.processor.image_processor(images=[[im] for im in images], return_tensors="pt")
    inputs = {k: v for k, v in pixels.items() if k in ("pixel_values", "image_grid_thw", "pixel_attention_mask")}
    out = vlm.model.model.get_image_features(**inputs, return_dict=True).pooler_output
    return torch.stack(list(out))  # a tuple, list or tensor of per-image features, by family


def feature_variation(features) -> float:
    """Mean distance between two images' features over their mean norm, for features [B, T, H];
    near 0 when the image barely changes what the language model receives."""
    import torch

    flat = features.detach().flatten(1).double()
    n = len(flat)
    return float(torch.cdist(flat, flat).sum() / (n * (n - 1)) / flat.norm(dim=1).mean())


def pretrain_vision(
    vlm,
    *,
    steps: int = 900,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    image_size: int = 64,
    eval_size: int = 256,
    cell_positions: bool = False,
) -> dict:
    """Train the vision encoder and projector of `vlm` (a models.VLM; nothing else changes) in
    place to tell what each grid cell of a shapes scene holds, through a throwaway linear head
    on the projected image features. With `cell_positions` a second per-token head also asks
    each image token which cell it lies in, so the features carry their place as well as their
    content (needs image tokens that tile the grid: 48x48 images for Qwen and LLaVA).

    Scenes come from the train split; the metrics, before and after, are measured on
    `eval_size` validation scenes (layouts training never saw). Deterministic for a seed."""
    import math
    import time

    import torch
    import torch.nn.functional as F

    from genrecal_cli.world.shapes import COLOURS, GRID, SHAPES, draw_scene, make_items

    start = time.perf_counter()
    eval_items = make_items("validation", eval_size, seed)
    eval_images = [draw_scene(it.scene, image_size) for it in eval_items]
    eval_labels = torch.tensor([cell_labels(it.scene) for it in eval_items])
    train_items = make_items("train", steps * batch_size, seed)
    cells, classes = GRID * GRID, 1 + len(COLOURS) * len(SHAPES)

    tokens, hidden = image_features(vlm, eval_images[:1]).shape[1:]
    side = math.isqrt(tokens)
    local = side * side == tokens and side % GRID == 0
    if cell_positions and not local:
        raise ValueError(f"cell_positions needs image tokens that tile the {GRID}x{GRID} grid; "
                         f"{tokens} tokens do not (use image_size 48 for Qwen and LLaVA)")
    with torch.random.fork_rng(devices=[]):  # a seeded head without disturbing the caller's RNG
        torch.manual_seed(seed)
        # When the image tokens tile the grid (48x48 images: Qwen 3x3 merged tokens, LLaVA 6x6),
        # one classifier shared by all tokens reads each token's own cell, so every token says
        # what its cell holds in the same code wherever it is. Otherwise (tokens straddle cell
        # edges, where a shared classifier plateaued near 88% cell accuracy) one linear map from
        # all tokens to all cells.
        head = torch.nn.Linear(hidden, classes) if local else torch.nn.Linear(tokens * hidden, cells * classes)
        where = torch.nn.Linear(hidden, cells) if cell_positions else None
    per = side // GRID
    # token (row r, column c) of the side x side raster lies in cell (r // per, c // per)
    token_cell = torch.tensor([(r // per) * GRID + c // per for r in range(side) for c in range(side)]) if local else None

    def cell_logits(features):
        if local:  # [B, T, classes] -> each cell's logits averaged over its tokens
            per_token = head(features)
            out = per_token.new_zeros(features.shape[0], cells, classes).index_add_(1, token_cell, per_token)
            return out / (per * per)
        return head(features.flatten(1)).view(-1, cells, classes)

    # Qwen's projector (visual.merger) lies inside its vision encoder: count each weight once.
    vision = {id(p): p for m in (vlm.vision_encoder, vlm.vision_projector) for p in m.parameters()}
    heads = [*head.parameters(), *(where.parameters() if where is not None else ())]
    optimizer = torch.optim.AdamW([*vision.values(), *heads], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)

    def evaluate() -> dict:
        with torch.no_grad():
            features = image_features(vlm, eval_images)
            out = cell_logits(features)
        right = out.argmax(-1) == eval_labels
        extra = {}
        if where is not None:
            extra["position_accuracy"] = (where(features).argmax(-1) == token_cell).float().mean().item()
        return {
            **extra,
            "loss": F.cross_entropy(out.flatten(0, 1), eval_labels.flatten()).item(),
            "cell_accuracy": right.float().mean().item(),
            # Most cells are empty (~78%): this is the accuracy that shows the model can see.
            "object_accuracy": right[eval_labels > 0].float().mean().item(),
            "feature_variation": feature_variation(features),
        }

    before = evaluate()
    for step in range(steps):
        items = train_items[step * batch_size : (step + 1) * batch_size]
        labels = torch.tensor([cell_labels(it.scene) for it in items])
        features = image_features(vlm, [draw_scene(it.scene, image_size) for it in items])
        loss = F.cross_entropy(cell_logits(features).flatten(0, 1), labels.flatten())
        if where is not None:  # each token also says which cell it lies in
            loss = loss + F.cross_entropy(where(features).flatten(0, 1), token_cell.repeat(len(features)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return {"before": before, "after": evaluate(), "steps": steps, "seconds": time.perf_counter() - start}
