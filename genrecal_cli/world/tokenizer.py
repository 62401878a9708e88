"""Tiny tokenizers trained on the spot in the styles of real checkpoints (Qwen, Llama, SmolVLM),
deliberately different, so that a pair of tiny models has what GenRecal is about: different
vocabularies, ids and splits."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

# The families zoo builds (all of models.FAMILIES), each with the tokenizer style its real
# checkpoints resemble. models is imported lazily: it pulls in torch and transformers.
DEFAULT_STYLE = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "internvl": "qwen", "llava": "llama", "idefics3": "smol"}


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


def _check_family(family: str) -> None:
    if family not in DEFAULT_STYLE:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(DEFAULT_STYLE)}")

