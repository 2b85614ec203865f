"""Publishing: ``push_to_hub``, ``hf upload`` and ``push_folder_to_hub`` against a loopback mock of the
Hub HTTP API started by each test (no network), and the generated model card (``README.md``)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import hub as H
from helpers.configs import TINY_MODEL_CONFIG
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.errors import HfHubHTTPError

from ssdd_diffusers import SSDDAutoencoder, decoder_preset, encoder_preset
from ssdd_diffusers.evaluation import EvaluationReport, ModelResult
from ssdd_diffusers.model_card import (
    config_rows,
    count_parameters,
    evaluation_markdown,
    read_card_info,
    write_model_card,
    write_model_card_for_folder,
)
from ssdd_diffusers.training.hub import HUB_IGNORE_PATTERNS, push_folder_to_hub

HF_CLI = Path(sys.executable).with_name("hf")

TRAINING_INFO = {
    "repo_id": "org/ssdd-tiny",
    "stage": "decoder (frozen encoder)",
    "base_model": "org/ssdd-teacher",
    "data": "imagefolder:/data/train",
    "num_images": 8,
    "skipped_images": 2,
    "resolution": 32,
    "global_step": 5,
    "train_batch_size": 2,
    "recipe": {"optimizer": "adamw", "learning_rate": 1e-4},
    "validation": {"val/psnr_1step": 21.5},
}


def folder_files(folder: Path) -> dict[str, bytes]:
    """``{posix relative path: bytes}`` of every file below ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """``{posix relative path: (bytes, mtime in ns)}`` of every file below ``folder``."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model() -> SSDDAutoencoder:
    torch.manual_seed(0)
    return SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG).eval()


@pytest.fixture()
def saved(model: SSDDAutoencoder, tmp_path: Path) -> Path:
    """A ``save_pretrained`` folder of the tiny model."""
    folder = tmp_path / "output"
    model.save_pretrained(folder)
    return folder


def make_report() -> EvaluationReport:
    """A two-model evaluation report without images (as ``ssdd-evaluate`` would produce)."""
    results = [
        ModelResult(
            label=label,
            source=f"./{label}",
            class_name="SSDDAutoencoder",
            num_inference_steps=steps,
            num_parameters=1_234_567,
            num_images=16,
            metrics={"psnr": psnr, "ssim": 0.81, "lpips": 0.12, "rfid": float("inf")},
            images_per_second=3.5,
            reconstruction_seconds=4.6,
            peak_memory_mb=None,
            memory_metric="not_measured",
        )
        for label, steps, psnr in (("ssdd-tiny@steps=4", 4, 24.25), ("ssdd-tiny-1step", 1, 23.75))
    ]
    return EvaluationReport(
        results=results,
        grid_originals=torch.empty(0, 3, 8, 8, dtype=torch.uint8),
        grid_reconstructions={},
        settings={"resolution": 32, "fid_features": "inception"},
    )


# ====================================================================================================
# Uploads
# ====================================================================================================
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_push_to_hub_uploads_the_saved_files_and_the_ssdd_card(
    model: SSDDAutoencoder, saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``push_to_hub`` uploads exactly what ``save_pretrained`` writes (same names, same bytes) plus a
    ``README.md``: the repo has no card yet (the lookup gets 404 ``EntryNotFound`` from the mock), so it
    is the SSDD card (config table, usage snippet for the repo id), not diffusers' generic one. One commit;
    the upload loads back from the mock."""
    expected = folder_files(saved)
    assert set(expected) == {"config.json", "diffusion_pytorch_model.safetensors"}
    with H.mock_hub_server() as hub:
        H.point_hub_client_at(monkeypatch, hub.url)
        commit = model.push_to_hub("org/ssdd-push", token="hf_fake")
        assert "org/ssdd-push" in hub.repos
        assert "HEAD /org/ssdd-push/resolve/main/README.md" in hub.requests  # the card lookup hit the mock
        commits = [r for r in hub.requests if r.startswith("POST /api/models/org/ssdd-push/commit/")]
        uploaded = dict(hub.files["org/ssdd-push"])
        loaded = SSDDAutoencoder.from_pretrained("org/ssdd-push", cache_dir=tmp_path / "cache")

    assert len(commits) == 1 and H.MOCK_COMMIT_OID in str(commit)  # upload_folder's CommitInfo
    assert set(uploaded) == set(expected) | {"README.md"}
    for name, data in expected.items():
        assert uploaded[name] == data, name

    text = uploaded["README.md"].decode()
    # The same card as write_model_card_for_folder writes for the saved folder and this repo id.
    assert uploaded["README.md"] == write_model_card_for_folder(saved, repo_id="org/ssdd-push").read_bytes()
    metadata = metadata_load_text(uploaded["README.md"])
    assert metadata["library_name"] == "diffusers" and "ssdd" in metadata["tags"]
    assert "# org/ssdd-push" in text and 'SSDDAutoencoder.from_pretrained("org/ssdd-push")' in text
    assert text.count("## Model configuration") == 1 and "| Latent channels | 4 |" in text
    total = sum(p.numel() for p in model.parameters())
    assert f"| Parameters | {total / 1e6:.2f} M ({total:,}) |" in text
    assert "diffusers model that has been pushed on the Hub" not in text
    assert read_card_info(saved)["repo_id"] == "org/ssdd-push"

    assert loaded.config.num_inference_steps == model.config.num_inference_steps
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_push_to_hub_keeps_an_existing_card(model: SSDDAutoencoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second ``push_to_hub`` to a repo that already has a ``README.md`` (here one the user edited after
    the first push) uploads the new weights but leaves that card unchanged; with ``subfolder`` no card is
    written (as diffusers)."""
    from huggingface_hub import upload_file

    user_card = b"---\nlicense: mit\n---\n\n# My own card\n\nHand-written, keep me.\n"
    torch.manual_seed(1)
    retrained = SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG).eval()
    with H.mock_hub_server() as hub:
        H.point_hub_client_at(monkeypatch, hub.url)
        model.push_to_hub("org/ssdd-again", token="hf_fake")
        first = dict(hub.files["org/ssdd-again"])
        assert b"## Model configuration" in first["README.md"]
        upload_file(
            path_or_fileobj=user_card, path_in_repo="README.md", repo_id="org/ssdd-again", token="hf_fake"
        )
        retrained.push_to_hub("org/ssdd-again", token="hf_fake", commit_message="Retrained")
        second = dict(hub.files["org/ssdd-again"])
        retrained.push_to_hub("org/ssdd-again", token="hf_fake", subfolder="vae")
        third = dict(hub.files["org/ssdd-again"])
        commits = [r for r in hub.requests if r.startswith("POST /api/models/org/ssdd-again/commit/")]

    assert len(commits) == 4  # first push, the user's card, second push, subfolder push
    assert second["README.md"] == user_card
    weights = "diffusion_pytorch_model.safetensors"
    assert second[weights] != first[weights]  # the new weights were uploaded
    assert set(third) == set(second) | {"vae/config.json", f"vae/{weights}"}
    assert third["README.md"] == user_card and third[f"vae/{weights}"] == second[weights]


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
@pytest.mark.parametrize("answer_only", [False, True], ids=["request-lost", "answer-lost"])
def test_push_to_hub_interrupted_then_retried(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer_only: bool
) -> None:
    """The mock hangs up on every commit request (``huggingface_hub`` retries it itself; its waits are
    made instant): one ``ConnectionError`` naming the repo, saying the upload was interrupted and that
    retrying is safe, with the transport error chained. The folder the model was loaded from is untouched
    (bytes and mtimes) and the temporary save is removed. Nothing is committed when the requests are lost;
    when only the answers are lost the files are there. A retry then uploads the complete model (the
    folder's weights and config, ``_name_or_path`` being the folder's name; the SSDD card), which loads
    back with the same weights."""
    model = SSDDAutoencoder.from_pretrained(saved)
    before = folder_state(saved)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where push_to_hub saves the model
    with H.mock_hub_server() as hub:
        H.point_hub_client_at(monkeypatch, hub.url)
        waits = H.instant_retries(monkeypatch)
        hub.drop_connection("/commit/", times=None, after_processing=answer_only)
        with pytest.raises(ConnectionError) as raised:
            model.push_to_hub("org/ssdd-drop", token="hf_fake")
        attempts, committed = list(hub.dropped), dict(hub.files.get("org/ssdd-drop", {}))
        after_failure, leftovers = folder_state(saved), list(scratch.iterdir())
        hub.stop_dropping()
        commit = model.push_to_hub("org/ssdd-drop", token="hf_fake")
        uploaded = dict(hub.files["org/ssdd-drop"])
        loaded = SSDDAutoencoder.from_pretrained("org/ssdd-drop", cache_dir=tmp_path / "cache")

    error = raised.value
    assert type(error) is ConnectionError and str(error).startswith(
        "Uploading the model to the Hub repo 'org/ssdd-drop' was interrupted ("
    )
    assert str(error).endswith("The local files are untouched; it is safe to retry.")
    assert error.__cause__ is not None and not isinstance(error.__cause__, HfHubHTTPError)
    assert f"({type(error.__cause__).__name__}: " in str(error)  # e.g. RemoteProtocolError
    assert attempts and set(attempts) == {"POST /api/models/org/ssdd-drop/commit/main"}
    assert len(waits) == len(attempts) - 1  # the library's own retries, if any, all failed
    expected = folder_files(saved)
    assert set(committed) == (set(expected) | {"README.md"} if answer_only else set())
    assert after_failure == before and leftovers == []
    assert folder_state(saved) == before and list(scratch.iterdir()) == []

    assert H.MOCK_COMMIT_OID in str(commit)
    assert set(uploaded) == set(expected) | {"README.md"}
    weights = "diffusion_pytorch_model.safetensors"
    assert uploaded[weights] == expected[weights]
    # diffusers records where the model was loaded from; only the folder's name is published.
    config = json.loads(expected["config.json"])
    assert json.loads(uploaded["config.json"]) == {**config, "_name_or_path": saved.name}
    assert uploaded["README.md"] == write_model_card_for_folder(saved, repo_id="org/ssdd-drop").read_bytes()
    reference = model.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_push_folder_to_hub_interrupted_then_retried(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``push_folder_to_hub`` losing every ``preupload`` request: one ``ConnectionError`` naming the repo;
    the folder (card, checkpoint) is untouched, nothing is committed, and a retry uploads it all."""
    write_model_card(saved, TRAINING_INFO)
    (saved / "checkpoint-2").mkdir()
    (saved / "checkpoint-2" / "optimizer.bin").write_bytes(b"not for the Hub")
    before = folder_state(saved)
    with H.mock_hub_server() as hub:
        H.point_hub_client_at(monkeypatch, hub.url)
        H.instant_retries(monkeypatch)
        hub.drop_connection("/preupload/", times=None)
        with pytest.raises(ConnectionError, match=r"the model folder to the Hub repo 'org/ssdd-fold'.*retry"):
            push_folder_to_hub(saved, "org/ssdd-fold", token="hf_fake")
        assert hub.dropped and "org/ssdd-fold" not in hub.files
        assert not any("/commit/" in request for request in hub.requests)
        assert folder_state(saved) == before
        hub.stop_dropping()
        push_folder_to_hub(saved, "org/ssdd-fold", token="hf_fake")
        uploaded = dict(hub.files["org/ssdd-fold"])

    assert folder_state(saved) == before
    expected = {k: v for k, v in folder_files(saved).items() if not k.startswith("checkpoint-")}
    assert set(expected) == {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}
    assert uploaded == expected


def test_hf_upload_cli_uploads_exactly_the_folder(saved: Path, tmp_path: Path) -> None:
    """``hf upload org/name ./output`` (the console script, in a subprocess pointed at the mock through
    HF_ENDPOINT) uploads exactly the folder's files: config, safetensors weights and the model card."""
    write_model_card(saved, {**TRAINING_INFO, "evaluation": make_report().to_markdown()})
    expected = folder_files(saved)
    assert set(expected) == {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}

    with H.mock_hub_server() as hub:
        result = subprocess.run(
            [str(HF_CLI), "upload", "org/ssdd-cli", "./output"],
            cwd=tmp_path,
            env=H.hub_cli_env(hub.url, tmp_path / "hf_home"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        uploaded = dict(hub.files.get("org/ssdd-cli", {}))
        commits = [r for r in hub.requests if r.startswith("POST /api/models/org/ssdd-cli/commit/")]

    assert len(commits) == 1  # one commit with every file
    assert set(uploaded) == set(expected)
    for name, data in expected.items():
        assert uploaded[name] == data, name
    assert metadata_load_text(uploaded["README.md"])["library_name"] == "diffusers"


def metadata_load_text(data: bytes) -> dict:
    """YAML metadata of a card given as bytes, parsed by ``huggingface_hub``."""
    return ModelCard(data.decode()).data.to_dict()


def test_push_folder_to_hub_skips_checkpoints_and_logs(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``push_folder_to_hub`` (``--push_to_hub``) uploads the model folder without ``checkpoint-*``
    (complete or ``.tmp``) and ``logs/``; every other file (validation grids included) is uploaded."""
    write_model_card(saved, TRAINING_INFO)
    for relative in (
        "checkpoint-2/optimizer.bin",
        "checkpoint-2/vae/config.json",
        "checkpoint-4.tmp/optimizer.bin",
        "logs/ssdd/events.out.tfevents.1",
    ):
        (saved / relative).parent.mkdir(parents=True, exist_ok=True)
        (saved / relative).write_bytes(b"not for the Hub")
    (saved / "validation").mkdir()
    (saved / "validation" / "final.png").write_bytes(b"\x89PNG fake")
    assert {"checkpoint-*", "logs/*"} <= set(HUB_IGNORE_PATTERNS)

    with H.mock_hub_server() as hub:
        H.point_hub_client_at(monkeypatch, hub.url)
        push_folder_to_hub(saved, "org/ssdd-folder", token="hf_fake")
        uploaded = dict(hub.files["org/ssdd-folder"])

    expected = {
        name: data
        for name, data in folder_files(saved).items()
        if not name.startswith(("checkpoint-", "logs/"))
    }
    assert set(expected) == {
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "README.md",
        "validation/final.png",
    }
    assert uploaded == expected


# ====================================================================================================
# Model card
# ====================================================================================================
def test_model_card_sections_and_metadata(model: SSDDAutoencoder, saved: Path) -> None:
    """Config table, training summary and evaluation table; the YAML metadata parses."""
    path = write_model_card(saved, {**TRAINING_INFO, "evaluation": make_report().to_markdown()})
    text = path.read_text()

    metadata = metadata_load(path)
    assert metadata["library_name"] == "diffusers" and metadata["license"] == "apache-2.0"
    assert "ssdd" in metadata["tags"] and metadata["base_model"] == "org/ssdd-teacher"
    assert ModelCard.load(path).data.library_name == "diffusers"

    assert text.count("## Model configuration") == 1
    assert "| Encoder | `f2c4` (custom widths [32, 32], 1 layer(s) per level) |" in text
    assert "| Latent channels | 4 |" in text
    assert "| Downsampling factor | 2 (latent = image / 2 per side) |" in text
    assert "| Default `num_inference_steps` | 4 |" in text
    assert "| `scaling_factor` | 1.0 |" in text and "| `shift_factor` | None |" in text
    total = sum(p.numel() for p in model.parameters())
    assert f"| Parameters | {total / 1e6:.2f} M ({total:,}) |" in text
    assert "## Training" in text and "Optimisation steps: 5" in text and "2 unreadable images skipped" in text
    assert "| `optimizer` | `adamw` |" in text and "| val/psnr_1step | 21.5000 |" in text
    assert "## Evaluation" in text and "| ssdd-tiny@steps=4 | 4 | 1.23 | 24.25 |" in text
    assert 'SSDDAutoencoder.from_pretrained("org/ssdd-tiny")' in text and "vae=SSDDAutoencoder" in text


def test_model_card_without_training_or_evaluation(saved: Path) -> None:
    """No evaluation (or training) information: no such heading at all, not an empty section."""
    path = write_model_card_for_folder(saved)
    text = path.read_text()
    assert "## Model configuration" in text
    assert "## Evaluation" not in text and "## Training" not in text and "Validation" not in text
    metadata = metadata_load(path)
    assert "base_model" not in metadata and metadata["library_name"] == "diffusers"
    # Blank evaluations are treated as missing too.
    write_model_card(saved, {"evaluation": "  "})
    assert "## Evaluation" not in (saved / "README.md").read_text()


def test_model_card_for_folder_adds_evaluation_json_and_keeps_training(saved: Path, tmp_path: Path) -> None:
    """``write_model_card_for_folder(folder, evaluation=<ssdd-evaluate output>)`` renders the JSON with
    ``EvaluationReport.to_markdown`` (same table as metrics.md) and keeps the card's training summary."""
    report = make_report()
    paths = report.save(tmp_path / "eval_results")
    write_model_card(saved, TRAINING_INFO)
    assert read_card_info(saved)["global_step"] == 5

    text = write_model_card_for_folder(saved, evaluation=paths["json"]).read_text()
    assert report.to_markdown().strip() in text
    assert "Source: `metrics.json`" in text and "Optimisation steps: 5" in text
    # The same table from the Markdown file, the output folder or the JSON object.
    markdown = report.to_markdown().strip() + "\n"
    assert evaluation_markdown(paths["markdown"]) == markdown
    assert evaluation_markdown(str(tmp_path / "eval_results")) == markdown
    assert evaluation_markdown(json.loads(paths["json"].read_text())) == markdown
    assert evaluation_markdown(report) == markdown
    # Rewriting without an evaluation keeps the previous one; a new repo id updates the usage snippet.
    text = write_model_card_for_folder(saved, repo_id="org/renamed").read_text()
    assert report.to_markdown().strip() in text and 'from_pretrained("org/renamed")' in text
    assert metadata_load(saved / "README.md")["library_name"] == "diffusers"


def test_model_card_metadata_edge_cases(saved: Path) -> None:
    """Local ``base_model`` paths stay out of the YAML and the text names only the folder; stored info
    survives ``--``/``-->`` in strings."""
    info = {**TRAINING_INFO, "base_model": str(saved), "data": "weird --> name -- here"}
    path = write_model_card(saved, info)
    assert "base_model" not in metadata_load(path)
    assert f"Initialised from: `{saved.name}`" in path.read_text() and str(saved) not in path.read_text()
    assert read_card_info(path)["data"] == "weird --> name -- here"
    # Any other metrics mapping: one row per scalar, nested mappings flattened, lists left out.
    table = evaluation_markdown({"model": "m", "mean": {"psnr": 24.0, "ssim": 0.5}, "images": [1, 2]})
    assert (
        table
        == "| metric | value |\n|---|---|\n| model | m |\n| mean/psnr | 24.0000 |\n| mean/ssim | 0.5000 |\n"
    )
    assert evaluation_markdown({}) is None and evaluation_markdown({"images": []}) is None
    with pytest.raises(FileNotFoundError):
        write_model_card_for_folder(saved / "missing")
    with pytest.raises(FileNotFoundError):
        evaluation_markdown(str(saved / "no_such_metrics.json"))


def test_config_rows_name_standard_presets(saved: Path, model: SSDDAutoencoder) -> None:
    """A standard configuration is named by its presets; parameter counts come from the safetensors header."""
    config = {**encoder_preset("f8c4"), **decoder_preset("M"), "num_inference_steps": 1, "sample_size": 256}
    config = json.loads(json.dumps(config))  # tuples become lists, as in config.json
    rows = dict(config_rows(config, {"total": 2_000_000}))
    assert rows["Encoder"] == "`f8c4`" and rows["Decoder size"].startswith("`M` (widths [96, 192, 288, 288]")
    assert rows["Downsampling factor"].startswith("8") and rows["Latent shape at `sample_size`"].startswith(
        "4×32×32"
    )
    assert rows["Parameters"] == "2.00 M (2,000,000)"

    counts = count_parameters(saved)
    assert counts is not None
    encoder = sum(p.numel() for p in model.encoder.parameters()) + sum(
        p.numel() for p in model.quant_conv.parameters()
    )
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["encoder"] == encoder
    assert counts["decoder"] == sum(p.numel() for p in model.decoder.parameters())
