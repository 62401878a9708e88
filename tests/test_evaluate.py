"""`genrecal eval`: both benchmarks through lm-eval on tiny models, the side-by-side table, the
JSON protocol, plain `lm_eval --model hf-multimodal` on the same folders, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genrecal_cli.errors import GenrecalError
from genrecal_cli.commands.evaluate.inputs import MMMU_COLUMNS
from genrecal_cli.commands.evaluate.run import BENCHMARKS, latest_student, parse_benchmarks

MMMU_SUBJECTS = (
    "Accounting", "Agriculture", "Architecture_and_Engineering", "Art", "Art_Theory", "Basic_Medical_Science",
    "Biology", "Chemistry", "Clinical_Medicine", "Computer_Science", "Design", "Diagnostics_and_Laboratory_Medicine",
    "Economics", "Electronics", "Energy_and_Power", "Finance", "Geography", "History", "Literature", "Manage",
    "Marketing", "Materials", "Math", "Mechanical_Engineering", "Music", "Pharmacy", "Physics", "Psychology",
    "Public_Health", "Sociology",
)  # fmt: skip


@pytest.fixture(scope="session")
def models(_private_cache):
    """Folders of the tiny teacher (Qwen2-VL family) and student (LLaVA family), as zoo saves them."""
    from genrecal_cli.world.zoo import resolve_source

    return {"teacher": resolve_source("zoo:tiny-teacher"), "student": resolve_source("zoo:tiny-student")}


def write_mmmu(root: Path, subjects=MMMU_SUBJECTS, drop: tuple[str, ...] = ()) -> Path:
    """A local copy of MMMU/MMMU in its own schema and layout (SUBJECT/validation-*.parquet), two
    items a subject: one multiple choice with an image, one open question."""
    import datasets
    from PIL import Image

    columns = {
        "id": datasets.Value("string"), "question": datasets.Value("string"), "options": datasets.Value("string"),
        "explanation": datasets.Value("string"), **{f"image_{i}": datasets.Image() for i in range(1, 8)},
        "img_type": datasets.Value("string"), "answer": datasets.Value("string"),
        "topic_difficulty": datasets.Value("string"), "question_type": datasets.Value("string"),
        "subfield": datasets.Value("string"),
    }  # fmt: skip
    features = datasets.Features({k: v for k, v in columns.items() if k not in drop})
    for subject in subjects:
        rows = {
            "id": [f"validation_{subject}_1", f"validation_{subject}_2"],
            "question": ["<image 1> What colour is the square?", "How many sides has a triangle?"],
            "options": ["['red', 'blue', 'green', 'yellow']", "[]"],
            "explanation": ["", ""],
            "image_1": [Image.new("RGB", (32, 32), (220, 30, 30)), None],
            **{f"image_{i}": [None, None] for i in range(2, 8)},
            "img_type": ["['Diagrams']", "[]"],
            "answer": ["A", "3"],
            "topic_difficulty": ["Easy", "Easy"],
            "question_type": ["multiple-choice", "open"],
            "subfield": ["shapes", "shapes"],
        }
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        data = datasets.Dataset.from_dict({k: v for k, v in rows.items() if k not in drop}, features=features)
        data.to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session")
def mmmu_dir(tmp_path_factory):
    return write_mmmu(tmp_path_factory.mktemp("mmmu"))


# --------------------------------------------------------------------------- the whole command


@pytest.fixture(scope="session")
def side_by_side(cli_session, models, mmmu_dir, tmp_path_factory):
    """One `genrecal eval` of teacher and student on both benchmarks, shared by the tests below."""
    out = tmp_path_factory.mktemp("eval") / "results.json"
    proc = cli_session(
        "eval", models["teacher"], models["student"], "--bench", "shapes,mmmu",
        "--limit", "1", "--batch-size", "8", "--device", "cpu", "--data-dir", str(mmmu_dir), "--output", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="session")
def cli_session():
    from tests.conftest import run_cli

    return run_cli


def test_side_by_side_table(side_by_side, models):
    proc, _ = side_by_side
    out = proc.stdout
    assert "side by side" in out
    for label in ("tiny-teacher", "tiny-student"):
        assert label in out
    for column in ("benchmark", "metric", "value", "stderr", "n"):
        assert column in out
    assert "shapes" in out and "mmmu" in out
    # Each model's table says how many items a benchmark used: 1 for shapes, 1 per MMMU subject.
    assert "│ 30 │" in out and "│  1 │" in out


def test_json_protocol(side_by_side, models, mmmu_dir):
    _, report = side_by_side
    protocol = report["protocol"]
    assert set(protocol["versions"]) >= {"genrecal", "lm_eval", "transformers"}
    assert protocol["harness"] == "lm-eval hf-multimodal"
    assert protocol["apply_chat_template"] is True and protocol["num_fewshot"] == 0
    assert protocol["limit"] == 1 and protocol["device"] == "cpu" and protocol["batch_size"] == 8
    shapes, mmmu = protocol["benchmarks"]["shapes"], protocol["benchmarks"]["mmmu"]
    assert list(shapes["tasks"]) == ["genrecal_shapes"] and len(shapes["tasks"]["genrecal_shapes"]) == 16
    assert shapes["generation"]["max_gen_toks"] == 48 and shapes["generation"]["do_sample"] is False
    assert "doc_to_text" in shapes["prompt"]
    assert mmmu["lm_eval_task"] == "mmmu_val" and len(mmmu["tasks"]) == 30
    assert mmmu["generation"]["max_gen_toks"] == 512
    assert mmmu["data"] == {"dataset": "MMMU/MMMU", "source": str(mmmu_dir.resolve())}

    teacher, student = report["models"]
    assert teacher["path"] == models["teacher"] and student["path"] == models["student"]
    assert teacher["dtype"] == "torch.float32"
    rows = {(r["benchmark"], r["metric"]): r for r in student["results"]}
    assert rows[("shapes", "acc")]["n"] == 1 and rows[("mmmu", "acc")]["n"] == 30
    assert all(0.0 <= r["value"] <= 1.0 for r in rows.values())
    # The prompts went through each model's own chat template, the image where lm-eval put it.
    assert teacher["examples"]["shapes"]["prompt"].startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert student["examples"]["shapes"]["prompt"].startswith("USER: <image>")
    assert "(A) red" in student["examples"]["mmmu"]["prompt"]
    (cmp_shapes,) = [c for c in report["comparison"] if c["benchmark"] == "shapes"]
    t, s = cmp_shapes["values"][teacher["label"]], cmp_shapes["values"][student["label"]]
    assert cmp_shapes["delta"][student["label"]] == pytest.approx(s - t)


def test_metadata_of_an_exported_student(models, tmp_path):
    """A folder with genrecal.json (what `genrecal distill` exports) carries its recipe and stages into the report."""
    from genrecal_cli.commands.evaluate import evaluate

    student = tmp_path / "run" / "student"
    shutil.copytree(models["student"], student)
    meta = {"recipe": {"train": {"output_dir": "run"}, "student": {"path": "zoo:tiny-student"}, "teacher": {"path": "t"}},
            "stages": {"align": {"steps": 2}, "distill": {"steps": 3}}}
    (student / "genrecal.json").write_text(json.dumps(meta))
    report = evaluate([str(student)], ["lm-eval:genrecal_shapes"], limit=2, batch_size=2, device="cpu").to_dict()
    (model,) = report["models"]
    assert model["produced_by"] == {"run": "run", "student_from": "zoo:tiny-student", "teacher": "t",
                                    "stages": {"align": 2, "distill": 3}, "final_stage": "distill"}
    # lm-eval:TASK passes any task through, here the shipped shapes task by its lm-eval name.
    (row,) = model["results"]
    assert row["benchmark"] == "lm-eval:genrecal_shapes" and row["n"] == 2
    assert latest_student(tmp_path) == student


# --------------------------------------------------------------------------- plain lm-eval


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_plain_lm_eval_gives_the_same_answers(which, models, tmp_path):
    """`lm_eval --model hf-multimodal --model_args pretrained=DIR` loads the folder without genrecal's
    model code and answers the first shapes item exactly as `genrecal eval` does."""
    from genrecal_cli.commands.evaluate import evaluate
    from genrecal_cli.commands.evaluate.tasks import TASKS_DIR

    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [str(lm_eval), "--model", "hf-multimodal", "--model_args", f"pretrained={models[which]}",
         "--tasks", "genrecal_shapes", "--include_path", str(TASKS_DIR), "--apply_chat_template",
         "--limit", "2", "--batch_size", "2", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples_file,) = tmp_path.rglob("samples_genrecal_shapes_*.jsonl")
    first = json.loads(samples_file.read_text().splitlines()[0])
    (results_file,) = tmp_path.rglob("results_*.json")
    plain = json.loads(results_file.read_text())["results"]["genrecal_shapes"]["acc,none"]

    ours = evaluate([models[which]], ["shapes"], limit=2, batch_size=2, device="cpu").models[0]
    assert ours.examples["shapes"]["prompt"] == first["arguments"]["gen_args_0"]["arg_0"]
    assert ours.examples["shapes"]["response"] == first["filtered_resps"][0]
    assert ours.rows[0]["value"] == plain


# --------------------------------------------------------------------------- bad input


def test_benchmark_names():
    assert parse_benchmarks("shapes, mmmu,lm-eval:mmmu_val_art") == ["shapes", "mmmu", "lm-eval:mmmu_val_art"]
    assert set(BENCHMARKS) == {"shapes", "mmmu"}
    with pytest.raises(GenrecalError, match="did you mean 'mmmu'"):
        parse_benchmarks("mmu")


def test_unknown_benchmark(cli, models):
    proc = cli("eval", models["student"], "--bench", "shapez")
    assert proc.returncode == 1
    assert "unknown benchmark 'shapez'; did you mean 'shapes'?" in proc.stderr
    assert "lm-eval:TASK" in proc.stderr


def test_unknown_lm_eval_task(cli, models):
    proc = cli("eval", models["student"], "--bench", "lm-eval:mmmu_val_artt", "--limit", "1")
    assert proc.returncode == 1
    assert "lm-eval has no task or group 'mmmu_val_artt'; did you mean lm-eval:mmmu_val_art" in proc.stderr


def test_limit_zero(cli, models):
    proc = cli("eval", models["student"], "--limit", "0")
    assert proc.returncode == 1
    assert "--limit 0: it must be at least 1" in proc.stderr


def test_not_a_vlm(cli, tmp_path):
    folder = tmp_path / "text-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    proc = cli("eval", str(folder), "--limit", "1")
    assert proc.returncode == 1
    assert "is not a vision-language model: model_type 'llama' (LlamaForCausalLM)" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("eval", str(empty), "--limit", "1")
    assert proc.returncode == 1 and "is not a model folder: no config.json" in proc.stderr
    proc = cli("eval", str(tmp_path / "nowhere"), "--limit", "1")
    assert proc.returncode == 1 and "no such model folder" in proc.stderr


def test_a_pickle_only_folder_is_refused_in_one_line(cli, models, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(models["teacher"], folder)
    weights = next(folder.glob("*.safetensors"))
    weights.rename(folder / "pytorch_model.bin")  # the name an old checkpoint's pickle has
    proc = cli("eval", str(folder), "--limit", "1")
    assert proc.returncode == 1 and "internal error" not in proc.stderr and "weights_only" not in proc.stderr
    assert "its weights are a pickle checkpoint (pytorch_model.bin); genrecal loads safetensors only" in proc.stderr


def test_no_image_token_id(cli, models, tmp_path):
    folder = tmp_path / "no-image-token"
    shutil.copytree(models["teacher"], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["image_token_id"]  # Qwen2VLConfig then falls back to the real Qwen2-VL's id
    (folder / "config.json").write_text(json.dumps(config))
    proc = cli("eval", str(folder), "--limit", "1")
    assert proc.returncode == 1
    assert "has no usable image token id: 151655" in proc.stderr


def test_mmmu_offline_without_data(cli, models, tmp_path):
    # an empty home and Hugging Face cache of its own: whatever this machine's cache holds
    env = {"HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = cli("eval", models["student"], "--bench", "mmmu", "--limit", "1", env=env)
    assert proc.returncode == 1
    assert "the MMMU/MMMU data set (mmmu) is not in the local Hugging Face cache" in proc.stderr
    assert "--data-dir DIR" in proc.stderr


def test_data_dir_in_the_wrong_schema(cli, models, tmp_path):
    write_mmmu(tmp_path / "mmmu", subjects=MMMU_SUBJECTS[:3], drop=("question_type",))
    proc = cli("eval", models["student"], "--bench", "mmmu", "--limit", "1", "--data-dir", str(tmp_path / "mmmu"))
    assert proc.returncode == 1
    assert "is not a local copy of MMMU/MMMU in its own schema" in proc.stderr
    assert "Accounting, Agriculture, Architecture_and_Engineering: no column question_type" in proc.stderr
    assert "Art/validation-*.parquet, Art_Theory/validation-*.parquet, Basic_Medical_Science/validation-*.parquet and 24 more missing" in proc.stderr
    assert ", ".join(MMMU_COLUMNS) in proc.stderr


def test_no_model_and_no_run(cli, tmp_path):
    proc = cli("eval", cwd=tmp_path)
    assert proc.returncode == 1
    assert "no MODEL given and no `genrecal distill` run found" in proc.stderr


def test_help_does_not_import_lm_eval():
    code = (
        "import sys\nfrom genrecal_cli.cli import main\n"
        "try:\n    main(['eval', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_offline_mmmu_message_names_a_command_the_installed_hub_client_has(tmp_path, monkeypatch):
    """Offline and not cached, mmmu asks for a local copy with a download command: that command
    exists in the installed huggingface_hub (`hf`; `huggingface-cli` is gone) with the options
    the message uses."""
    import re

    from genrecal_cli.errors import DataError
    from genrecal_cli.commands.evaluate.inputs import check_mmmu_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DataError) as err:
        check_mmmu_data(None, {"mmmu_val_art": "Art"})
    command = re.search(r"`(hf download [^`]+)`", str(err.value))
    assert command, str(err.value)
    words = command.group(1).split()
    hf = shutil.which("hf", path=str(Path(sys.executable).parent))
    assert hf is not None, "the hub client's `hf` command is not installed beside this Python"
    helped = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0
    for option in (w for w in words if w.startswith("--")):
        assert option in helped.stdout, option
