"""Tiny offline VLMs built from configs, for tests and the demo: each family's real architecture
at toy size, saved as a folder that loads exactly like a real checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .pretrain import pretrain_vision
from .tokenizer import _check_family, build_tokenizer


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
