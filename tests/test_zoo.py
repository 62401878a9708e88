"""Tiny tokenizers and models: deterministic, deliberately different across styles, real file layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from genrecal_cli.world import zoo
from genrecal_cli.world.pretrain import cell_labels, image_features, pretrain_vision
from genrecal_cli.world.tiny_vlm import build_tiny_vlm
from genrecal_cli.world.tokenizer import build_tokenizer
from genrecal_cli.models import FAMILIES, load_vlm

SENTENCE = "How many purple triangles are in the top left?"


@pytest.fixture(scope="module")
def qwen():
    return build_tokenizer("qwen2_vl")


@pytest.fixture(scope="module")
def llama():
    return build_tokenizer("llava")


@pytest.fixture(scope="module")
def smol():
    return build_tokenizer("idefics3")


def test_tokenizers_are_deterministic(qwen, llama):
    for family, tok in (("qwen2_vl", qwen), ("llava", llama)):
        again = build_tokenizer(family)
        assert again.get_vocab() == tok.get_vocab()
        assert again(SENTENCE)["input_ids"] == tok(SENTENCE)["input_ids"]


def test_styles_differ_in_size_ids_and_splits(qwen, llama, smol):
    assert len({len(qwen), len(llama), len(smol)}) == 3
    ids = [tuple(t(" circle", add_special_tokens=False)["input_ids"]) for t in (qwen, llama, smol)]
    assert len(set(ids)) == 3
    # Not just renumbered: the same sentence is cut into different pieces.
    pieces = [
        tuple(t.convert_ids_to_tokens(t(SENTENCE, add_special_tokens=False)["input_ids"])) for t in (qwen, llama, smol)
    ]
    lengths = {len(p) for p in pieces}
    assert len(lengths) > 1
    for tok in (qwen, llama, smol):
        assert tok.decode(tok(SENTENCE, add_special_tokens=False)["input_ids"]).strip() == SENTENCE


def test_special_tokens_stay_whole(qwen, llama, smol):
    for tok, specials in (
        (qwen, ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]),
        (llama, ["<s>", "</s>", "<unk>", "<image>"]),
        (smol, ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]),
    ):
        for s in specials:
            assert tok(s, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(s)], s


def test_internvl_tokens_and_named_attributes():
    tok = build_tokenizer("internvl")
    assert (tok.start_image_token, tok.context_image_token, tok.end_image_token) == ("<img>", "<IMG_CONTEXT>", "</img>")
    assert tok.context_image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")


def _chat(tok, answer="red"):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return tok.apply_chat_template(messages, tokenize=False)


def test_chat_templates(qwen, llama, smol):
    assert _chat(qwen) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )
    assert _chat(llama) == "USER: <image>\nWhat colour? ASSISTANT: red</s>"
    assert _chat(smol) == "<|im_start|>User:<image>What colour?<end_of_utterance>\nAssistant: red<end_of_utterance>\n"
    # Llama style: BOS comes from the tokenizer, not the template; the others add none.
    assert llama("USER: hi")["input_ids"][0] == llama.bos_token_id
    assert qwen("hi")["input_ids"] == qwen("hi", add_special_tokens=False)["input_ids"]


def test_style_can_be_chosen_per_family():
    tok = build_tokenizer("qwen2_vl", "llama", corpus=["a red circle", "a blue square"] * 20)
    assert _chat(tok).startswith("USER: <|vision_start|><|image_pad|><|vision_end|>What")
    assert tok.image_token == "<|image_pad|>"


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        build_tiny_vlm("gpt2", tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer style 'bert'"):
        build_tokenizer("llava", "bert")


def test_build_writes_a_checkpoint_and_is_seeded(tmp_path, llama):
    a = build_tiny_vlm("llava", tmp_path / "a", tokenizer=llama, seed=1)
    b = build_tiny_vlm("llava", tmp_path / "b", tokenizer=llama, seed=1)
    c = build_tiny_vlm("llava", tmp_path / "c", tokenizer=llama, seed=2)
    assert {p.name for p in a.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any((wa[k] != wc[k]).any() for k in wa)


def test_build_sizes(tmp_path):
    vlm = load_vlm(str(build_tiny_vlm("qwen2_vl", tmp_path, hidden_size=128, num_layers=3)))
    assert (vlm.hidden_size, len(vlm.language_model.layers)) == (128, 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        build_tiny_vlm("qwen2_vl", tmp_path / "odd", image_size=60)


def test_importing_zoo_stays_light():
    code = ("import sys, genrecal_cli.world.zoo, genrecal_cli.world.pretrain; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "[]", run.stderr


def test_cell_labels():
    from genrecal_cli.world.shapes import Obj

    labels = cell_labels((Obj("circle", "red", 0), Obj("triangle", "orange", 8)))
    assert labels == [1, 0, 0, 0, 0, 0, 0, 0, 1 + 5 * 3 + 2]


def _split(state: dict, vlm) -> tuple[dict, dict]:
    """(vision encoder and projector weights, all other weights) of a state dict."""
    family = FAMILIES[vlm.family]
    prefixes = tuple(f"model.{p}." for p in (family.vision_encoder, family.vision_projector))
    vision = {k: v for k, v in state.items() if k.startswith(prefixes)}
    return vision, {k: v for k, v in state.items() if k not in vision}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pretrain_vision_trains_only_vision_and_makes_it_see(tmp_path, family):
    vlm = load_vlm(str(build_tiny_vlm(family, tmp_path)))
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    metrics = pretrain_vision(vlm, steps=120, batch_size=8, eval_size=32)

    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["after"]["feature_variation"] > metrics["before"]["feature_variation"]
    vision_before, rest_before = _split(before, vlm)
    vision_after, rest_after = _split(vlm.model.state_dict(), vlm)
    assert all(torch.equal(rest_before[k], rest_after[k]) for k in rest_before)  # LM and lm_head untouched
    changed = {k for k in vision_before if not torch.equal(vision_before[k], vision_after[k])}
    projector = f"model.{FAMILIES[family].vision_projector}."
    assert any(k.startswith(projector) for k in changed)  # for Qwen, inside the encoder
    assert any(not k.startswith(projector) for k in changed)
    assert all(p.grad is None for p in vlm.model.parameters())


def test_pretrain_vision_can_teach_each_token_its_cell(tmp_path):
    # With cell_positions the image features learn to say where they are as well as what they
    # show, so a language model can read a position off an attended image token as it reads a
    # colour (bench/replicate.py's teacher).
    vlm = load_vlm(str(build_tiny_vlm("llava", tmp_path, image_size=48)))
    metrics = pretrain_vision(vlm, steps=600, batch_size=8, eval_size=32, cell_positions=True)
    assert metrics["before"]["position_accuracy"] < 0.3  # about 1 in 9 by chance
    assert metrics["after"]["position_accuracy"] > 0.5
    with pytest.raises(ValueError, match="tile"):  # 64x64: 16 Qwen tokens straddle the cell edges
        pretrain_vision(load_vlm(str(build_tiny_vlm("qwen2_vl", tmp_path / "64"))), steps=1, cell_positions=True)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "idefics3"])
def test_image_features_match_the_image_tokens(tmp_path, family):
    from PIL import Image

    vlm = load_vlm(str(build_tiny_vlm(family, tmp_path)))
    features = image_features(vlm, [Image.new("RGB", (64, 64))] * 3)
    assert features.shape == (3, vlm.image_tokens_per_image(), vlm.hidden_size)


def test_build_with_pretraining_is_seeded_and_changes_only_vision(tmp_path, llama):
    plain = build_tiny_vlm("llava", tmp_path / "plain", tokenizer=llama)
    a = build_tiny_vlm("llava", tmp_path / "a", tokenizer=llama, pretrain_steps=3)
    b = build_tiny_vlm("llava", tmp_path / "b", tokenizer=llama, pretrain_steps=3)
    wa, wb = (load_file(d / "model.safetensors") for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    vlm0, vlma = load_vlm(str(plain)), load_vlm(str(a))
    vision0, rest0 = _split(vlm0.model.state_dict(), vlm0)
    visiona, resta = _split(vlma.model.state_dict(), vlma)
    assert all(torch.equal(rest0[k], resta[k]) for k in rest0)
    assert any(not torch.equal(vision0[k], visiona[k]) for k in vision0)


def test_the_shipped_teacher_resolves_loads_and_is_in_the_wheel(tmp_path):
    import shutil
    import zipfile

    from .conftest import ROOT

    folder = zoo.resolve_source("zoo:shapes-teacher")
    vlm = load_vlm(folder)
    assert (vlm.family, vlm.hidden_size, vlm.text_config.num_hidden_layers) == ("qwen2_vl", 128, 8)
    with pytest.raises(Exception, match=r"unknown built-in model 'zoo:nope'; choose one of zoo:shapes-teacher, "):
        zoo.resolve_source("zoo:nope")
    # a wheel (what pip installs from an index) carries the asset, every file of it
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "genrecal_cli", src / "genrecal_cli", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("genrecal-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"genrecal_cli/world/assets/shapes-teacher/{p.name}" for p in zoo.SHIPPED["shapes-teacher"].iterdir()}
    assert shipped and shipped <= names
