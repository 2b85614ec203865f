"""Training-script options beyond the upstream recipe: the AutoencoderKL baseline, the clean one-step recipe
(--prediction_type edm, --one_step_fraction, --recon_weight), the time-budget guard, the bundled sample
photos, a streamed local dataset, and the two scripts run as files."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from helpers.configs import TINY_MODEL_CONFIG, tiny_autoencoder_kl
from helpers.images import generated_image, make_image_folder

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.training.arguments import parse_args
from ssdd_diffusers.training.trainer import main as train_main

REPO = Path(__file__).resolve().parents[2]
COMMON = [
    "--resolution", "32", "--train_batch_size", "2", "--lpips_weight", "0", "--repa_weight", "0",
    "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "0",
    "--num_validation_images", "2", "--validation_inference_steps", "2", "--seed", "0", "--no_progress",
]  # fmt: skip


def run(argv: list[str], distill: bool = False) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train_main(parse_args(argv, distill=distill))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("option_images") / "images", count=6)


def test_autoencoder_kl_decoder_baseline_trains_only_the_decoder(images: Path, tmp_path: Path) -> None:
    source = tiny_autoencoder_kl(levels=2, seed=5)
    source.save_pretrained(tmp_path / "encoder")
    out = tmp_path / "kl"
    result = run(["--train_data_dir", str(images), "--output_dir", str(out), *COMMON,
                  "--decoder_type", "kl", "--pretrained_encoder", str(tmp_path / "encoder"),
                  "--recon_weight", "1", "--optimizer", "adamw", "--lr_warmup_steps", "0",
                  "--max_train_steps", "3"])  # fmt: skip
    assert result["global_step"] == 3 and all("recon" in h and "fm" not in h for h in result["loss_history"])
    trained = AutoencoderKL.from_pretrained(out)
    for name, tensor in trained.encoder.state_dict().items():
        assert torch.equal(tensor, source.encoder.state_dict()[name]), name
    torch.manual_seed(0)  # the run's seed: the decoder it started from, trained for 3 steps
    fresh = AutoencoderKL.from_config(source.config)
    for module in ("decoder", "post_quant_conv"):
        for name, tensor in getattr(trained, module).state_dict().items():
            assert not torch.equal(tensor, getattr(source, module).state_dict()[name]), f"{module}.{name}"
    moved = (trained.decoder.conv_out.weight - fresh.decoder.conv_out.weight).abs().max()
    assert 0 < moved < 0.05, moved
    assert "val/psnr_1step" in result["validation"]

    joint_config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    result = run(["--train_data_dir", str(images), "--output_dir", str(tmp_path / "joint"), *COMMON,
                  "--decoder_type", "kl", "--train_encoder", "--model_config", json.dumps(joint_config),
                  "--recon_weight", "1", "--max_train_steps", "2"])  # fmt: skip
    assert all("kl" in h for h in result["loss_history"])
    for conflict in (["--distill", "--teacher_model_name_or_path", str(out)], ["--multiscale_stages", "2"]):
        with pytest.raises(ValueError, match="does not combine"):
            parse_args(["--train_data_dir", str(images), "--decoder_type", "kl",
                        "--pretrained_encoder", str(tmp_path / "encoder"), *conflict])  # fmt: skip
    with pytest.raises(ValueError, match="exactly one"):
        parse_args(["--train_data_dir", str(images), "--decoder_type", "kl"])


def test_clean_one_step_recipe_flags_and_time_guard(images: Path, tmp_path: Path) -> None:
    """--prediction_type edm makes the fresh decoder preconditioned; the recipe flags reach the objective
    and the model card; --max_train_minutes stops the run early, saves it and says so."""
    out = tmp_path / "edm"
    result = run(["--train_data_dir", str(images), "--output_dir", str(out), *COMMON,
                  "--model_config", json.dumps(TINY_MODEL_CONFIG), "--prediction_type", "edm",
                  "--one_step_fraction", "0.5", "--recon_weight", "1", "--max_train_steps", "40",
                  "--max_train_minutes", "0.00001"])  # fmt: skip
    assert result["stopped_by_time_budget"] and result["global_step"] == 1
    assert {"fm", "recon", "step_seconds"} <= set(result["loss_history"][0])
    assert result["loss_history"][0]["step_seconds"] > 0
    saved = SSDDAutoencoder.from_pretrained(out)
    assert saved.config.prediction_type == "edm"
    card = (out / "README.md").read_text()
    assert "one_step_fraction" in card and "recon_weight" in card
    with pytest.raises(ValueError, match="prediction_type"):
        parse_args(["--train_data_dir", str(images), "--pretrained_model_name_or_path", str(out),
                    "--prediction_type", "edm"])  # fmt: skip
    result = run(["--train_data_dir", str(images), "--output_dir", str(tmp_path / "student"), *COMMON,
                  "--teacher_model_name_or_path", str(out), "--teacher_steps", "2", "--distill_noise",
                  "independent", "--recon_weight", "1", "--max_train_steps", "2"], distill=True)  # fmt: skip
    assert not result["stopped_by_time_budget"] and result["global_step"] == 2
    student = SSDDAutoencoder.from_pretrained(tmp_path / "student")
    assert student.config.num_inference_steps == 1 and student.config.prediction_type == "edm"


def test_sample_photos_source(tmp_path: Path) -> None:
    argv = ["--sample_photos", "train", "--crops_per_image", "2", "--output_dir", str(tmp_path), *COMMON]
    result = run(argv + ["--model_config", json.dumps(TINY_MODEL_CONFIG), "--max_train_steps", "2"])
    assert result["global_step"] == 2 and result["images_seen"] == 4
    with pytest.raises(ValueError, match="exactly one"):
        parse_args(["--sample_photos", "train", "--train_data_dir", str(tmp_path)])


def test_streaming_a_local_parquet_dataset(tmp_path: Path) -> None:
    """--streaming reads through datasets' streaming builder (a local parquet folder here, as a Hub
    dataset would be read), with --max_train_steps since the length is unknown."""
    import datasets

    folder = tmp_path / "parquet_dataset"
    folder.mkdir()
    table = datasets.Dataset.from_dict(
        {"image": [generated_image(i) for i in range(5)], "label": list(range(5))}
    )
    table.cast_column("image", datasets.Image()).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(ValueError, match="--streaming needs --max_train_steps"):
        parse_args(["--dataset_name", str(folder), "--streaming"])
    argv = ["--dataset_name", str(folder), "--streaming", "--output_dir", str(tmp_path / "out"), *COMMON]
    result = run(argv + ["--model_config", json.dumps(TINY_MODEL_CONFIG), "--max_train_steps", "3"])
    # the 5-image stream in batches of 2: 2 + 2 + 1 images, every one read once
    assert result["global_step"] == 3 and result["images_seen"] == 5 and result["skipped_images"] == 0
    assert "val/psnr_1step" in result["validation"]  # validation images taken from the stream too


@pytest.mark.parametrize("script", ["train_ssdd.py", "distill_ssdd.py"])
def test_scripts_run_as_files(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--decoder_type" in result.stdout and "--one_step_fraction" in result.stdout
    description = "Single-step distillation" if script == "distill_ssdd.py" else "Train an SSDD autoencoder"
    assert description in result.stdout


def test_custom_perceptual_distance_flag(images: Path, tmp_path: Path) -> None:
    """--lpips_net package.module:factory reaches the objective (here the KL baseline) and the results;
    anything else that is not an lpips trunk is refused before training."""
    tiny_autoencoder_kl(levels=2, seed=5).save_pretrained(tmp_path / "encoder")
    result = run(["--train_data_dir", str(images), "--output_dir", str(tmp_path / "kl"), *COMMON,
                  "--decoder_type", "kl", "--pretrained_encoder", str(tmp_path / "encoder"),
                  "--recon_weight", "1", "--lpips_weight", "0.5", "--lpips_net", "torch.nn:L1Loss",
                  "--max_train_steps", "2"])  # fmt: skip
    assert all(h["lpips"] > 0 and "recon" in h for h in result["loss_history"])
    torch.testing.assert_close(  # the custom distance is the L1 loss here: both terms see the same pair
        torch.tensor(result["loss_history"][0]["lpips"]), torch.tensor(result["loss_history"][0]["recon"])
    )
    with pytest.raises(ValueError, match="package.module:factory"):
        parse_args(["--train_data_dir", str(images), "--lpips_net", "resnet"])
