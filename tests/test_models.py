"""load_vlm and the uniform VLM view, on every family's tiny model saved as a real checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig, ProcessorMixin

from genrecal_cli.world.tiny_vlm import build_tiny_vlm
from genrecal_cli.errors import ModelLoadError
from genrecal_cli.models import FAMILIES, Qwen2VLImageOnlyProcessor, load_vlm

# family: (image tokens per 64x64 image, decoder layer class, processor class plain transformers loads)
EXPECTED = {
    "qwen2_vl": (16, "Qwen2VLDecoderLayer", "PaddleOCRVLProcessor"),
    "qwen2_5_vl": (16, "Qwen2_5_VLDecoderLayer", "PaddleOCRVLProcessor"),
    "llava": (64, "LlamaDecoderLayer", "LlavaProcessor"),
    "internvl": (16, "Qwen2DecoderLayer", "QianfanOCRProcessor"),
    "idefics3": (16, "LlamaDecoderLayer", "Idefics3Processor"),
}
QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_vlm(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def vlms(folders) -> dict:
    return {f: load_vlm(str(p)) for f, p in folders.items()}


def _image(colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (64, 64), colour)


def _inputs(processor, question=QUESTION, answer=None):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=answer is None)
    return processor(images=[_image()], text=[prompt], return_tensors="pt")


def test_every_family_is_covered():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_view_describes_the_model(vlms, family):
    vlm = vlms[family]
    text = vlm.model.config.get_text_config()
    assert vlm.family == family
    assert vlm.hidden_size == text.hidden_size == 64
    assert vlm.vocab_size == text.vocab_size
    # The head covers every token the tokenizer can produce; tiny models pad it to 64 rows like real ones.
    assert vlm.head_rows == vlm.head.weight.shape[0] == vlm.vocab_size >= len(vlm.tokenizer)
    assert vlm.head is vlm.model.lm_head
    assert vlm.input_embeddings.weight.shape == (vlm.vocab_size, 64)
    assert vlm.decoder_layer_class.__name__ == EXPECTED[family][1]
    assert all(isinstance(layer, vlm.decoder_layer_class) for layer in vlm.language_model.layers)
    assert vlm.tokenizer.convert_tokens_to_ids(vlm.image_token) == vlm.image_token_id
    assert vlm.path.endswith(family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_module_handles_split_the_model(vlms, family):
    vlm = vlms[family]
    params = lambda m: {id(p) for p in m.parameters()}  # noqa: E731
    encoder, projector, body = params(vlm.vision_encoder), params(vlm.vision_projector), params(vlm.language_model)
    assert encoder and projector and body
    assert not body & (encoder | projector)
    if family.startswith("qwen"):
        assert projector < encoder  # the merger lives inside the vision tower
    else:
        assert not encoder & projector
    # Vision, projector, body and head hold every parameter.
    head = params(vlm.head)
    assert encoder | projector | body | head == params(vlm.model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_image_tokens_and_body_match_the_model(vlms, family):
    vlm = vlms[family]
    inputs = _inputs(vlm.processor, answer="red")
    n_image = int((inputs["input_ids"] == vlm.image_token_id).sum())
    assert n_image == vlm.image_tokens_per_image() == vlm.image_tokens_per_image((64, 64)) == EXPECTED[family][0]
    with torch.no_grad():
        hidden = vlm.body(**inputs)
        logits = vlm.model(**inputs).logits
    assert hidden.shape == (1, inputs["input_ids"].shape[1], vlm.hidden_size)
    assert torch.allclose(vlm.head(hidden), logits, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_body_sees_the_image(vlms, family):
    vlm = vlms[family]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    red, blue = (
        vlm.processor(images=[_image(c)], text=[prompt], return_tensors="pt") for c in ((200, 30, 30), (30, 30, 220))
    )
    with torch.no_grad():
        assert not torch.allclose(vlm.body(**red)[0, -1], vlm.body(**blue)[0, -1])


def test_image_tokens_follow_the_size_only_for_dynamic_resolution(vlms):
    # Qwen2-VL keeps an image's size (within min/max pixels): 32x32 -> 4x4 patches -> 4 tokens.
    assert vlms["qwen2_vl"].image_tokens_per_image((32, 32)) == 4
    assert vlms["qwen2_vl"].image_tokens_per_image((32, 64)) == 8
    # LLaVA resizes every image to 64x64.
    assert vlms["llava"].image_tokens_per_image((32, 48)) == 64


def test_body_matches_logits_on_a_padded_batch(vlms):
    vlm = vlms["llava"]
    prompts = [
        vlm.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in ("Is there a circle?", "How many shapes are in the top left corner?")
    ]
    inputs = vlm.processor(images=[_image(), _image()], text=prompts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        assert torch.allclose(vlm.head(vlm.body(**inputs)), vlm.model(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_folder_loads_through_plain_auto_classes(folders, vlms, family):
    model = AutoModelForImageTextToText.from_pretrained(folders[family])
    processor = AutoProcessor.from_pretrained(folders[family])
    assert isinstance(processor, ProcessorMixin)
    inputs = _inputs(processor)
    ours = _inputs(vlms[family].processor)
    assert torch.equal(inputs["input_ids"], ours["input_ids"])
    assert torch.equal(inputs["pixel_values"], ours["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, vlms[family].model(**ours).logits)


_FRESH = """
import json, sys
{imports}
from PIL import Image
from transformers import AutoProcessor
out = {{}}
for family, folder in json.loads(sys.argv[1]).items():
    p = AutoProcessor.from_pretrained(folder)
    msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Is it red?"}}]}}]
    prompt = p.apply_chat_template(msgs, add_generation_prompt=True)
    x = p(images=[Image.new("RGB", (64, 64), (200, 30, 30))], text=[prompt])
    out[family] = [type(p).__name__, list(x["input_ids"][0])]
out["genrecal imported"] = "genrecal_cli.models" in sys.modules
print(json.dumps(out))
"""


@pytest.mark.parametrize("imports", ["", "import genrecal_cli.models"])
def test_fresh_process_loads_each_processor(folders, vlms, imports):
    """lm-eval's hf-multimodal model calls plain AutoProcessor: it must get a real processor,
    with or without genrecal imported, and tokenize exactly as load_vlm's processor does."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    arg = json.dumps({f: str(p) for f, p in folders.items()})
    code = _FRESH.format(imports=imports)
    run = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out.pop("genrecal imported") == bool(imports)
    for family, (cls, ids) in out.items():
        assert cls == EXPECTED[family][2]
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
        proc = vlms[family].processor
        ours = proc(images=[_image()], text=[proc.apply_chat_template(prompt, add_generation_prompt=True)])
        assert ids == list(ours["input_ids"][0])


def test_saved_processor_never_names_a_class_plain_transformers_lacks(vlms, tmp_path):
    # Without the named image token PaddleOCRVLProcessor cannot work; the stock class is named
    # instead (it fails loudly without torchvision rather than yielding a bare tokenizer).
    from transformers import PreTrainedTokenizerFast

    proc = vlms["qwen2_vl"].processor
    plain_tokenizer = PreTrainedTokenizerFast(tokenizer_object=proc.tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    assert getattr(plain_tokenizer, "image_token", None) is None
    Qwen2VLImageOnlyProcessor(proc.image_processor, plain_tokenizer).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    # load_vlm's loader still reads it, image tokens and all.
    again = Qwen2VLImageOnlyProcessor.from_pretrained(tmp_path)
    assert again.image_token == "<|image_pad|>"
    assert again.image_token_id == proc.image_token_id


def test_load_casts_dtype(folders):
    vlm = load_vlm(str(folders["llava"]), dtype="bfloat16")
    assert vlm.model.dtype == torch.bfloat16


# --------------------------------------------------------------------------- errors


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match=f"no such model folder: {missing}"):
        load_vlm(str(missing))


def test_folder_without_config_says_what_it_found(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ModelLoadError, match=r"not a model folder: no config\.json \(found: weights\.bin\)") as e:
        load_vlm(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_unsupported_architecture_is_named(tmp_path):
    text_only = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    text_only.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"unsupported architecture, model_type 'llama'.*supported: qwen2_vl"):
        load_vlm(str(tmp_path))


def test_hub_id_offline_says_so():  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(ModelLoadError, match=r"cannot reach the hub for 'Qwen/Qwen2-VL-2B-Instruct' \(offline\)"):
        load_vlm("Qwen/Qwen2-VL-2B-Instruct")


def test_folder_without_safetensors_is_refused(folders, tmp_path):
    shutil.copy(folders["llava"] / "config.json", tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_vlm(str(tmp_path))


def test_bare_tokenizer_from_auto_processor_is_refused(folders, tmp_path):
    folder = shutil.copytree(folders["llava"], tmp_path / "llava")
    config = folder / "processor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "processor_class": "SomeCustomProcessor"}))
    with pytest.raises(ModelLoadError, match="bare TokenizersBackend"):
        load_vlm(str(folder))


def test_unknown_dtype_is_refused(folders):
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        load_vlm(str(folders["llava"]), dtype="fp8")
