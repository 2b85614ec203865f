"""Nothing private in what gets published: model cards and configs written by training, distillation,
``ssdd-diffusers convert`` / ``stats`` / ``evaluate`` and uploaded to a loopback mock of the Hub name a
local folder by its last component only (or "a local folder"), never by its absolute path, a parent folder,
the home directory or the user name. Hub ids stay as they are."""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import hub as H
from helpers.configs import FIXTURES, TINY_MODEL_CONFIG
from helpers.images import make_image_folder
from huggingface_hub import ModelCard
from training.test_training import assets, base_args, run  # noqa: F401  (assets: the fixture)

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.cli import main
from ssdd_diffusers.model_card import (
    LOCAL_FOLDER,
    public_source_name,
    read_card_info,
    write_model_card,
    write_model_card_for_folder,
)
from ssdd_diffusers.training.hub import push_folder_to_hub

pytestmark = [
    pytest.mark.filterwarnings("ignore:LPIPS is built with a RANDOMLY INITIALISED"),
    pytest.mark.usefixtures("single_thread"),
]

FAKE_USER = "alice-q7private"
"""The user name (and home folder name) of the tests: distinctive, so that any occurrence is a leak."""
REAL_USER = getpass.getuser()
REAL_HOME = str(Path.home())
TEXT_SUFFIXES = {".md", ".json", ".yaml", ".yml", ".txt"}
UPSTREAM_SMALL = FIXTURES / "upstream_parity_small" / "small_state_dict.safetensors"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder ``.../home/alice-q7private`` that is ``HOME`` and the user name for the test."""
    home = tmp_path / "home" / FAKE_USER
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):  # what getpass.getuser() reads first
        monkeypatch.setenv(variable, FAKE_USER)
    monkeypatch.chdir(tmp_path)
    assert getpass.getuser() == FAKE_USER and Path.home() == home
    return home


def private_strings(*paths: Path) -> set[str]:
    """The paths, all their parent folders (but ``/``), both home folders and the fake user name."""
    found = {FAKE_USER, REAL_HOME} - {"", "/"}
    for path in paths:
        found.add(str(path))
        found.update(str(parent) for parent in path.parents if str(parent) != "/")
    return found


def assert_nothing_private(files: dict[str, bytes], *paths: Path) -> list[str]:
    """Check every text file of ``files`` (name -> bytes); returns the names checked."""
    secrets = private_strings(*paths)
    real_user = re.compile(rf"(?<![\w-]){re.escape(REAL_USER)}(?![\w-])")
    checked = []
    for name, data in sorted(files.items()):
        if Path(name).suffix.lower() not in TEXT_SUFFIXES:
            continue
        text = data.decode("utf-8")
        leaks = sorted(secret for secret in secrets if secret in text)
        assert not leaks, f"{name} contains {leaks}"
        assert not real_user.search(text), f"{name} contains the user name {REAL_USER!r}"
        checked.append(name)
    return checked


def published(folder: Path) -> dict[str, bytes]:
    """The files of a model folder that ``push_folder_to_hub`` uploads (no checkpoints, no logs)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and not p.relative_to(folder).parts[0].startswith(("checkpoint-", "logs"))
    }


# ====================================================================================================
# The helper
# ====================================================================================================
def test_public_source_name(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub ids and plain names unchanged; local paths (absolute, relative, ``~``, Windows, ``Path``) by
    their last component; a last component that is empty or holds the user name as "a local folder"."""
    photos = home / "data" / "photos"
    photos.mkdir(parents=True)
    assert public_source_name("org/ssdd-f8c4-M") == "org/ssdd-f8c4-M"
    assert public_source_name("ILSVRC/imagenet-1k") == "ILSVRC/imagenet-1k"
    assert public_source_name("scikit-image sample photos (train)") == "scikit-image sample photos (train)"
    assert public_source_name(None) == "" and public_source_name("") == ""
    assert public_source_name(str(photos)) == "photos"
    assert public_source_name(str(photos) + "/") == "photos"
    assert public_source_name(photos) == "photos"
    assert public_source_name("~/data/photos") == "photos"
    assert public_source_name("../data/photos") == "photos"
    assert public_source_name("C:\\Users\\bob\\models\\teacher") == "teacher"
    assert public_source_name("imagefolder:/srv/data/train") == "train"
    assert public_source_name("my_pkg.nets:make_distance") == "my_pkg.nets:make_distance"  # not a path
    assert public_source_name(str(home)) == LOCAL_FOLDER  # last component = the user name
    assert public_source_name(home / f"{FAKE_USER.upper()}_photos") == LOCAL_FOLDER  # holds it as a word
    assert public_source_name(home / f"{FAKE_USER}ly") == f"{FAKE_USER}ly"  # not as a word
    assert public_source_name("~") == LOCAL_FOLDER
    assert public_source_name("/") == LOCAL_FOLDER
    assert public_source_name(LOCAL_FOLDER) == LOCAL_FOLDER  # idempotent
    monkeypatch.chdir(photos)
    assert public_source_name(".") == "photos"
    monkeypatch.chdir(home)
    assert public_source_name(".") == LOCAL_FOLDER
    # A relative folder that reads as a Hub id but exists here is a local folder.
    (tmp_path / "org" / "local-model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert public_source_name("org/local-model") == "local-model"
    assert public_source_name("org/remote-model") == "org/remote-model"


def test_card_of_an_old_info_with_paths_is_cleaned(home: Path, tmp_path: Path) -> None:
    """``write_model_card`` cleans whatever ``info`` it is given, also the info stored in the card: a
    card written with absolute paths in every path entry shows (and keeps) only the last components."""
    model_dir = home / "models" / "ssdd-tiny"
    SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG).save_pretrained(model_dir)
    teacher, data, evaluation = home / "models" / "teacher", home / "data" / "photos", home / "eval"
    info = {
        "stage": "distillation",
        "base_model": str(teacher),
        "data": str(data),
        "evaluation_source": str(evaluation / "metrics.json"),
        "evaluation": "| metric | value |\n|---|---|\n| psnr | 30.0 |\n",
        "recipe": {"teacher": str(teacher), "repa_model": str(home / "dino"), "optimizer": "adamw"},
    }
    path = write_model_card(model_dir, info)
    text = path.read_text()
    assert "Initialised from: `teacher`" in text and "- Data: photos (" in text
    assert "| `teacher` | `teacher` |" in text and "| `repa_model` | `dino` |" in text
    assert "Source: `metrics.json`" in text and "| `optimizer` | `adamw` |" in text
    stored = read_card_info(path)
    assert stored["base_model"] == "teacher" and stored["recipe"]["repa_model"] == "dino"
    assert "base_model" not in ModelCard(text).data.to_dict()
    assert assert_nothing_private({"README.md": text.encode()}, teacher, data, evaluation) == ["README.md"]


# ====================================================================================================
# Training, distillation
# ====================================================================================================
def test_training_and_distillation_publish_no_local_paths(
    assets: dict[str, Path],  # noqa: F811
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 2-step fine-tuning run (absolute data, initial model, DINOv2, ``--model_config`` file and output
    paths, all under the home folder) pushed to the mock Hub, then a 1-step distillation of its output:
    the output folders and the uploaded files hold no local path; the cards name the folders."""
    data = Path(shutil.copytree(assets["images"], home / "datasets" / "photos"))
    dino = Path(shutil.copytree(assets["dino"], home / "models" / "dino"))
    init = Path(shutil.copytree(assets["init_model"], home / "models" / "init-model"))
    config_file = home / "configs" / "tiny.json"
    config_file.parent.mkdir()
    config_file.write_text(json.dumps(TINY_MODEL_CONFIG))
    out, student = home / "runs" / "ssdd-run", home / "runs" / "ssdd-run-1step"
    paths = (data, dino, init, config_file, out, student)
    folders = {"images": data, "dino": dino}

    with H.mock_hub_server() as hub:
        H.point_hub_client_at(monkeypatch, hub.url)
        train_argv = base_args(folders, out, "--max_train_steps", "2", "--model_config", str(config_file))
        train_argv += ["--pretrained_model_name_or_path", str(init), "--push_to_hub"]
        train_argv += ["--hub_model_id", "org/ssdd-private", "--hub_token", "hf_fake"]
        assert run(train_argv)["global_step"] == 2
        distill_argv = base_args(folders, student, "--max_train_steps", "1", "--teacher_steps", "2")
        distill_argv += ["--teacher_model_name_or_path", str(out)]
        assert run(distill_argv, distill=True)["global_step"] == 1
        push_folder_to_hub(student, "org/ssdd-private-1step", token="hf_fake")
        uploads = {repo: dict(files) for repo, files in hub.files.items()}

    checked = [
        assert_nothing_private(uploads["org/ssdd-private"], *paths),
        assert_nothing_private(uploads["org/ssdd-private-1step"], *paths),
        assert_nothing_private(published(out), *paths),
        assert_nothing_private(published(student), *paths),
    ]
    assert all({"README.md", "config.json"} <= set(names) for names in checked)
    card = uploads["org/ssdd-private"]["README.md"].decode()
    assert card == (out / "README.md").read_text()
    assert "Initialised from: `init-model`" in card and "- Data: photos (" in card
    assert "| `repa_model` | `dino` |" in card and "# org/ssdd-private" in card
    student_card = (student / "README.md").read_text()
    assert "Initialised from: `ssdd-run`" in student_card and "| `teacher` | `ssdd-run` |" in student_card
    for text in (card, student_card):
        assert "base_model" not in ModelCard(text).data.to_dict()  # local folders are not Hub metadata


# ====================================================================================================
# Conversion and the command line
# ====================================================================================================
def test_conversion_and_cli_publish_no_local_paths(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``convert`` (absolute checkpoint and output), ``stats`` (in place and into ``--output_dir``),
    ``evaluate`` added to the card, ``push_folder_to_hub`` and ``push_to_hub`` of a model loaded from an
    absolute path: no written or uploaded text file holds a local path (the ``_name_or_path`` that
    diffusers' ``from_pretrained`` records and ``save_pretrained`` writes is the folder name)."""
    checkpoint = home / "checkpoints" / "upstream-small.safetensors"
    checkpoint.parent.mkdir()
    shutil.copyfile(UPSTREAM_SMALL, checkpoint)
    converted, restated = home / "converted" / "ssdd-small", home / "converted" / "ssdd-small-stats"
    images = make_image_folder(home / "photos", count=2)
    eval_dir = home / "eval"
    paths = (checkpoint, converted, restated, images, eval_dir)
    data = ["--data_dir", str(images), "--resolution", "32", "--num_workers", "0", "--no_progress"]

    assert main(["convert", str(checkpoint), str(converted), "--num_inference_steps", "1"]) == 0
    assert main(["stats", str(converted), *data, "--output_dir", str(restated)]) == 0
    assert main(["stats", str(converted), *data]) == 0  # in place
    extra = ["--fid_feature_extractor", "none", "--lpips_backbone", "none", "--warmup_batches", "0"]
    assert main(["evaluate", f"{converted}@steps=1", *data, *extra, "--output_dir", str(eval_dir)]) == 0
    write_model_card_for_folder(converted, evaluation=str(eval_dir / "metrics.json"), repo_id="org/ssdd-conv")

    with H.mock_hub_server() as hub:
        H.point_hub_client_at(monkeypatch, hub.url)
        push_folder_to_hub(converted, "org/ssdd-conv", token="hf_fake")
        SSDDAutoencoder.from_pretrained(str(restated)).push_to_hub("org/ssdd-stats", token="hf_fake")
        uploads = {repo: dict(files) for repo, files in hub.files.items()}

    checked = [
        assert_nothing_private(published(converted), *paths),
        assert_nothing_private(published(restated), *paths),
        assert_nothing_private(uploads["org/ssdd-conv"], *paths),
        assert_nothing_private(uploads["org/ssdd-stats"], *paths),
    ]
    assert checked[0] == checked[2] == ["README.md", "config.json"] and checked[1] == ["config.json"]
    assert checked[3] == ["README.md", "config.json"]
    config = json.loads(uploads["org/ssdd-stats"]["config.json"])
    assert config["_name_or_path"] == "ssdd-small-stats" and len(config["latents_mean"]) == 4
    assert json.loads((restated / "config.json").read_text())["_name_or_path"] == "ssdd-small"
    assert "_name_or_path" not in json.loads((converted / "config.json").read_text())  # built, not loaded
    card = uploads["org/ssdd-conv"]["README.md"].decode()
    assert "## Evaluation" in card and "Source: `metrics.json`" in card and "| ssdd-small (1 step) |" in card
    assert os.fspath(checkpoint) not in card and "org/ssdd-conv" in card
