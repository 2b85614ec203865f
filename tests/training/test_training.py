"""Tests for the training loop (training/train_ssdd.py, training/distill_ssdd.py) and ssdd_diffusers.training.

Offline and CPU-only: 32 px generated images, a tiny SSDD config, LPIPS with a random backbone, a tiny
randomly initialised DINOv2 saved to a temp folder, and a mock Hub on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers.configs import TINY_MODEL_CONFIG, tiny_autoencoder_kl
from helpers.dino import make_tiny_dino
from helpers.hub import mock_hub_server
from helpers.images import make_image_folder
from safetensors.torch import load_file

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.training.arguments import parse_args
from ssdd_diffusers.training.checkpoints import (
    CHECKPOINT_MARKER,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint_atomic,
)
from ssdd_diffusers.training.ema import create_ema
from ssdd_diffusers.training.model_loading import ENCODER_CONFIG_KEYS
from ssdd_diffusers.training.objective import LossWeights, SSDDObjective
from ssdd_diffusers.training.optim import split_weight_decay_parameters
from ssdd_diffusers.training.reproducibility import EpochShuffleSampler, derive_seed
from ssdd_diffusers.training.trainer import main as train_main

REPO = Path(__file__).resolve().parents[2]

RESOLUTION = 32


# ----------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated image folders, a tiny DINOv2 and a saved tiny initial model."""
    root = tmp_path_factory.mktemp("training_assets")
    torch.manual_seed(0)
    init = SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG)
    init.save_pretrained(root / "init_model")
    return {
        "images": make_image_folder(root / "images", count=8),
        "corrupt_images": make_image_folder(root / "corrupt_images", count=8, corrupt=True),
        "dino": make_tiny_dino(root / "dino"),
        "init_model": root / "init_model",
    }


def base_args(assets: dict[str, Path], output_dir: Path, *extra: str, data: str = "images") -> list[str]:
    """Command line of a tiny offline run."""
    return [
        "--train_data_dir", str(assets[data]),
        "--output_dir", str(output_dir),
        "--resolution", str(RESOLUTION),
        "--model_config", json.dumps(TINY_MODEL_CONFIG),
        "--lpips_backbone", "random",
        "--repa_model", str(assets["dino"]),
        "--train_batch_size", "2",
        "--report_to", "none",
        "--validation_steps", "0",
        "--checkpointing_steps", "0",
        "--num_validation_images", "2",
        "--validation_inference_steps", "4",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def run(argv: list[str], distill: bool = False) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if distill:
            return train_main(parse_args(argv, distill=True))
        return train_main(parse_args(argv))


def load_images(folder: Path, count: int = 4) -> torch.Tensor:
    from ssdd_diffusers.data import EvalTransform, ImageFolderDataset

    dataset = ImageFolderDataset(folder, EvalTransform(RESOLUTION))
    return torch.stack([dataset[i]["pixel_values"] for i in range(count)])


@torch.no_grad()
def fixed_fm_loss(vae: SSDDAutoencoder, images: torch.Tensor, repeats: int = 4) -> float:
    """Flow-matching loss on fixed images with fixed z, t and noise (a deterministic measurement)."""
    vae.eval()
    generator = torch.Generator().manual_seed(1234)
    z = vae.encode(images).latent_dist.mode()
    total = 0.0
    for _ in range(repeats):
        t = torch.sigmoid(torch.randn(images.shape[0], generator=generator))
        noise = torch.randn(images.shape, generator=generator)
        x_t = (1 - t.view(-1, 1, 1, 1)) * images + t.view(-1, 1, 1, 1) * noise
        total += torch.mean((vae.decoder(x_t, t, z) - (images - noise)) ** 2).item()
    return total / repeats


def state(folder: Path, name: str = "diffusion_pytorch_model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


# ----------------------------------------------------------------------------------------------------
# Library units
# ----------------------------------------------------------------------------------------------------
def test_weight_decay_groups() -> None:
    """Only conv/linear weights decay; biases, norms and relative-position bias tables do not."""
    torch.manual_seed(0)
    vae = SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG)
    decay, no_decay = split_weight_decay_parameters(vae)
    decay_names = [n for n, _ in decay]
    no_decay_names = [n for n, _ in no_decay]
    assert len(decay) + len(no_decay) == sum(1 for p in vae.parameters() if p.requires_grad)
    assert not any(n.endswith(".bias") for n in decay_names)
    assert not any("relative_bias_table" in n for n in decay_names)
    assert any("relative_bias_table" in n for n in no_decay_names)
    assert not any("norm" in n for n in decay_names if n.endswith("norm.weight") or "norm1.weight" in n)
    assert all(p.ndim > 1 for _, p in decay)
    assert any("conv_in.weight" in n for n in decay_names) and any("proj_in.weight" in n for n in decay_names)
    vae.encoder.requires_grad_(False)  # frozen parameters are left out
    decay2, no_decay2 = split_weight_decay_parameters(vae)
    assert not any(".encoder." in n for n, _ in decay2 + no_decay2)


def test_ema_start_step_semantics() -> None:
    """Before --ema_start_step the EMA copies the weights; then decay = min(decay, (1+n)/(10+n))."""
    torch.manual_seed(0)
    vae = SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG)
    ema = create_ema(vae, decay=0.5, start_step=3)
    param = next(vae.parameters())
    for step in range(1, 7):
        with torch.no_grad():
            param.add_(1.0)
        before = ema.shadow_params[0].clone()
        ema.step(vae.parameters())
        n = max(0, step - 3 - 1)
        expected_decay = 0.0 if n == 0 else min(0.5, (1 + n) / (10 + n))
        assert ema.cur_decay_value == pytest.approx(expected_decay)
        expected = before - (1 - expected_decay) * (before - param.detach())
        torch.testing.assert_close(ema.shadow_params[0], expected)
        if step <= 3:
            torch.testing.assert_close(ema.shadow_params[0], param.detach())


def test_sampler_is_function_of_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(10, seed=3), EpochShuffleSampler(10, seed=3)
    b.set_epoch(0)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(1)
    assert list(a) != list(b)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 2, 4)


def test_interrupted_checkpoint_is_ignored(tmp_path: Path) -> None:
    """A save interrupted mid-write leaves only checkpoint-N.tmp: `latest` picks the previous one."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    assert model is not None
    save_checkpoint_atomic(accelerator, tmp_path, 2, state={"skipped_images": 1})
    assert resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"

    original = accelerator.save_state

    def crash(output_dir: str, **kwargs) -> None:
        original(output_dir, **kwargs)  # files are written ... then the process dies before the rename
        raise KeyboardInterrupt

    accelerator.save_state = crash
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomic(accelerator, tmp_path, 4)
    assert (tmp_path / "checkpoint-4.tmp").is_dir() and not (tmp_path / "checkpoint-4").exists()
    (tmp_path / "checkpoint-5").mkdir()  # a folder without the completion marker is ignored too
    assert resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    with pytest.raises(FileNotFoundError):
        resolve_resume_checkpoint(tmp_path, "checkpoint-5")
    assert resolve_resume_checkpoint(tmp_path / "empty", "latest") is None

    accelerator.save_state = original  # the next save removes the stale .tmp and rotates
    save_checkpoint_atomic(accelerator, tmp_path, 6, total_limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-6"]
    assert not (tmp_path / "checkpoint-4.tmp").exists()
    assert json.loads((tmp_path / "checkpoint-6" / CHECKPOINT_MARKER).read_text())["step"] == 6
    assert prune_checkpoints(tmp_path, None) == []


def test_objective_terms_and_weights(assets: dict[str, Path]) -> None:
    """Weight 0 drops a term (and REPA with weight 0 never loads DINOv2); KL only with the encoder."""
    torch.manual_seed(0)
    vae = SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG)
    images = load_images(assets["images"], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = SSDDObjective(
            vae, LossWeights(), train_encoder=True, lpips_backbone="random", repa_model=str(assets["dino"])
        )
        out = full(images, torch.Generator().manual_seed(0))
        assert set(out) == {"loss", "fm", "lpips", "repa", "kl"}
        expected = out["fm"] + 0.5 * out["lpips"] + 0.25 * out["repa"] + 1e-6 * out["kl"]
        torch.testing.assert_close(out["loss"].detach(), expected)
        lean = SSDDObjective(vae, LossWeights(lpips=0, repa=0), repa_model="/does/not/exist")
    assert lean.lpips is None and lean.repa is None
    assert set(lean(images, torch.Generator().manual_seed(0))) == {"loss", "fm"}


# ----------------------------------------------------------------------------------------------------
# Training script
# ----------------------------------------------------------------------------------------------------
def test_loss_decreases_and_frozen_encoder_is_unchanged(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    images = load_images(assets["images"])
    init = SSDDAutoencoder.from_pretrained(assets["init_model"])
    before = fixed_fm_loss(init, images)
    result = run(
        base_args(
            assets,
            out,
            "--pretrained_model_name_or_path",
            str(assets["init_model"]),
            "--max_train_steps",
            "12",
            "--optimizer",
            "adamw",
            "--learning_rate",
            "2e-3",
            "--lr_warmup_steps",
            "0",
        )
    )
    trained = SSDDAutoencoder.from_pretrained(out)
    after = fixed_fm_loss(trained, images)
    print(f"fixed-batch FM loss: {before:.4f} -> {after:.4f} (ratio {after / before:.3f})")
    assert after < 0.7 * before
    assert result["global_step"] == 12 and "kl" not in result["loss_history"][-1]
    init_state, final_state = init.state_dict(), trained.state_dict()
    for name, tensor in init_state.items():
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tensor, final_state[name]), name
    assert any(not torch.equal(t, final_state[n]) for n, t in init_state.items() if n.startswith("decoder."))


def test_pretrained_encoder_from_autoencoder_kl(assets: dict[str, Path], tmp_path: Path) -> None:
    """--pretrained_encoder takes an AutoencoderKL (here inside a pipeline-style 'vae' subfolder): the
    trained model encodes exactly like it and carries its latent scaling."""
    kl = tiny_autoencoder_kl(levels=2, scaling_factor=0.13025, shift_factor=0.1)
    kl.save_pretrained(tmp_path / "sd_pipeline" / "vae")
    decoder_only = {k: v for k, v in TINY_MODEL_CONFIG.items() if k not in ENCODER_CONFIG_KEYS}
    argv = base_args(assets, tmp_path / "run", "--max_train_steps", "2")
    argv[argv.index("--model_config") + 1] = json.dumps(decoder_only)
    argv += ["--pretrained_encoder", str(tmp_path / "sd_pipeline"), "--pretrained_encoder_subfolder", "vae"]
    result = run(argv)
    assert result["global_step"] == 2
    trained = SSDDAutoencoder.from_pretrained(tmp_path / "run").eval()
    assert trained.config.scaling_factor == 0.13025 and trained.config.shift_factor == 0.1
    images = load_images(assets["images"], count=2)
    with torch.no_grad():
        ours, theirs = trained.encode(images).latent_dist, kl.encode(images).latent_dist
    torch.testing.assert_close(ours.mean, theirs.mean, atol=0, rtol=0)
    torch.testing.assert_close(ours.logvar, theirs.logvar, atol=0, rtol=0)

    with pytest.raises(ValueError, match="--pretrained_encoder fixes the encoder"):
        kl_folder = str(tmp_path / "sd_pipeline" / "vae")
        run(base_args(assets, tmp_path / "bad", "--pretrained_encoder", kl_folder))


def test_train_encoder_changes_encoder_and_adds_kl(assets: dict[str, Path], tmp_path: Path) -> None:
    """--train_encoder updates the encoder and logs KL; --repa_weight 0 never touches --repa_model."""
    out = tmp_path / "run"
    argv = base_args(
        assets,
        out,
        "--pretrained_model_name_or_path",
        str(assets["init_model"]),
        "--max_train_steps",
        "2",
        "--optimizer",
        "adamw",
        "--lr_warmup_steps",
        "0",
        "--train_encoder",
        "--repa_weight",
        "0",
    )
    argv[argv.index("--repa_model") + 1] = str(tmp_path / "no_dino_here")
    result = run(argv)
    assert all("kl" in h and "repa" not in h for h in result["loss_history"])
    init_state = SSDDAutoencoder.from_pretrained(assets["init_model"]).state_dict()
    final_state = SSDDAutoencoder.from_pretrained(out).state_dict()
    encoder = [n for n in init_state if n.startswith("encoder.")]
    changed = [n for n in encoder if not torch.equal(init_state[n], final_state[n])]
    assert len(changed) > 0.5 * len(encoder)


@pytest.mark.parametrize(
    ("optimizer", "total", "every"),
    # RAdam's rectification makes schedule-free's first 4 steps no-ops: resume after real updates.
    [("adamw", 4, 2), ("radam_schedulefree", 8, 3)],
)
def test_exact_resume(
    assets: dict[str, Path], tmp_path: Path, optimizer: str, total: int, every: int
) -> None:
    """N steps in one go == stop at a checkpoint, resume from `latest` (ignoring broken folders), finish."""
    stop = (total // every) * every
    extra = [
        "--optimizer",
        optimizer,
        "--lr_warmup_steps",
        "2",
        "--checkpointing_steps",
        str(every),
        "--learning_rate",
        "2e-3",
        "--ema_start_step",
        "1",
        "--ema_decay",
        "0.9",
        "--validation_steps",
        str(every),
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    run(base_args(assets, full, "--max_train_steps", str(total), *extra))
    first = run(base_args(assets, split, "--max_train_steps", str(stop), *extra))
    assert first["global_step"] == stop
    # A save interrupted mid-write and a folder missing its completion marker must both be ignored.
    (split / f"checkpoint-{stop + 1}.tmp" / "vae").mkdir(parents=True)
    (split / f"checkpoint-{stop + 1}.tmp" / "optimizer.bin").write_bytes(b"partial")
    (split / f"checkpoint-{total + 1}").mkdir()
    resume = ["--max_train_steps", str(total), "--resume_from_checkpoint", "latest"]
    resumed = run(base_args(assets, split, *resume, *extra))
    assert [h["step"] for h in resumed["loss_history"]] == list(range(stop + 1, total + 1))

    ckpt = f"checkpoint-{stop}"
    for name in ("", f"{ckpt}/vae", f"{ckpt}/vae_ema"):
        a, b = state(full / name), state(split / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], msg=f"{name}:{key}")
    projector = f"{ckpt}/repa_projector.safetensors"
    a, b = state(full, projector), state(split, projector)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    at_stop, final = state(full / f"{ckpt}/vae"), state(full)  # the resumed steps did update the weights
    assert any(not torch.equal(at_stop[k], final[k]) for k in final if k.startswith("decoder."))


def test_corrupt_images_outputs_model_card_and_hub(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corrupt files are skipped and counted; the saved model loads and decodes; validation grid, model
    card, checkpoint rotation; --push_to_hub uploads the model without intermediate checkpoints."""
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.hf_api as hf_api

    out = tmp_path / "run"
    with mock_hub_server() as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hf_api.api, "endpoint", hub.url)  # the module-level HfApi behind create_repo
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        argv = base_args(
            assets,
            out,
            "--max_train_steps",
            "5",
            "--checkpointing_steps",
            "2",
            "--checkpoints_total_limit",
            "1",
            "--validation_steps",
            "5",
            "--push_to_hub",
            "--hub_model_id",
            "user/ssdd-tiny",
            "--hub_token",
            "hf_fake",
            "--random_flip",
            "--random_resize_scale",
            "2",
            data="corrupt_images",
        )
        result = run(argv)
    # 8 good + 2 corrupt files, batch 2: one epoch is 5 steps, so both corrupt files were read once.
    assert result["skipped_images"] == 2 and result["images_seen"] == 8
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert (out / "validation" / "step_0000005.png").is_file()
    assert (out / "validation" / "final.png").is_file()

    vae = SSDDAutoencoder.from_pretrained(out)
    images = load_images(assets["images"], 2)
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode(), num_inference_steps=2).sample
    assert recon.shape == images.shape and torch.isfinite(recon).all()

    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "Optimisation steps: 5" in card
    assert "2 unreadable images skipped" in card and "val/psnr_1step" in card

    files = hub.files["user/ssdd-tiny"]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(files)
    assert not any(p.startswith("checkpoint-") for p in files)
    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    assert files["diffusion_pytorch_model.safetensors"] == weights


def test_distillation_student_matches_teacher(assets: dict[str, Path], tmp_path: Path) -> None:
    """After a short distillation the 1-step student is much closer to the N-step teacher (same noise)."""
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    teacher = SSDDAutoencoder.from_preset("f8c4", decoder="M", **TINY_MODEL_CONFIG)
    teacher.save_pretrained(teacher_dir)
    teacher_steps = 4

    images = load_images(assets["images"], 4)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))

    @torch.no_grad()
    def gap(student: SSDDAutoencoder) -> float:
        z = teacher.encode(images).latent_dist.mode()
        target = teacher.decode(z, noise=noise, num_inference_steps=teacher_steps).sample
        one = student.decode(z, noise=noise, num_inference_steps=1).sample
        return torch.mean((one - target) ** 2).item()

    teacher.eval()
    before = gap(teacher)
    out = tmp_path / "student"
    # Pure L2 distillation here: LPIPS and REPA with random stand-in networks only add noise.
    argv = base_args(
        assets,
        out,
        "--teacher_model_name_or_path",
        str(teacher_dir),
        "--teacher_steps",
        str(teacher_steps),
        "--max_train_steps",
        "40",
        "--train_batch_size",
        "4",
        "--optimizer",
        "adamw",
        "--lr_warmup_steps",
        "0",
        "--lpips_weight",
        "0",
        "--repa_weight",
        "0",
    )
    args = parse_args(argv, distill=True)
    assert args.distill and args.learning_rate == 1e-4 and args.teacher_model_name_or_path
    result = run(argv, distill=True)
    student = SSDDAutoencoder.from_pretrained(out).eval()
    after = gap(student)
    print(f"student-teacher MSE: {before:.5f} -> {after:.5f} (ratio {after / before:.3f})")
    assert student.config.num_inference_steps == 1
    assert after <= 0.5 * before
    assert result["global_step"] == 40
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tensor, teacher_state[name])


def test_accelerate_launch_two_processes(assets: dict[str, Path], tmp_path: Path) -> None:
    """Two CPU processes (gloo DDP) train and write exactly one checkpoint set.

    accelerate 1.x's `launch --cpu --num_processes 2` starts ONE process unless an MPI hostfile is given,
    so the two CPU processes are started with `--multi_gpu` (torchrun) plus ACCELERATE_USE_CPU=true, which
    makes accelerate pick MULTI_CPU with the gloo backend."""
    out = tmp_path / "ddp"
    argv = base_args(
        assets,
        out,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--optimizer",
        "adamw",
        "--lr_warmup_steps",
        "0",
        "--num_validation_images",
        "0",
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "ACCELERATE_USE_CPU": "true",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--multi_gpu",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "training" / "train_ssdd.py"),
        *argv,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "MULTI_CPU" in proc.stdout + proc.stderr
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-2"]
    ckpt = out / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl", "optimizer.bin", CHECKPOINT_MARKER} <= {
        p.name for p in ckpt.iterdir()
    }
    assert (ckpt / "vae" / "config.json").is_file() and (ckpt / "vae_ema" / "config.json").is_file()
    marker = json.loads((ckpt / CHECKPOINT_MARKER).read_text())
    assert marker["step"] == 2 and marker["images_seen"] == 8  # 2 steps x 2 processes x batch 2
    SSDDAutoencoder.from_pretrained(out)


@torch.no_grad()
def fixed_multiscale_loss(vae: SSDDAutoencoder, images: torch.Tensor, stages: int, repeats: int = 4) -> float:
    """Multi-scale flow-matching loss on fixed images with fixed stage, τ and noise draws."""
    from ssdd_diffusers.training.multiscale import multiscale_flow_matching_loss

    vae.eval()
    generator = torch.Generator().manual_seed(4321)
    z = vae.encode(images).latent_dist.mode()
    losses = [
        multiscale_flow_matching_loss(vae.decoder, images, z, stages, generator)["fm"].item()
        for _ in range(repeats)
    ]
    return sum(losses) / repeats


def test_multiscale_training_lowers_loss_and_records_layout(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ms"
    images = load_images(assets["images"])
    init = SSDDAutoencoder.from_pretrained(assets["init_model"])
    before = fixed_multiscale_loss(init, images, 2)
    run(
        base_args(
            assets,
            out,
            "--pretrained_model_name_or_path",
            str(assets["init_model"]),
            "--multiscale_stages",
            "2",
            "--max_train_steps",
            "12",
            "--optimizer",
            "adamw",
            "--learning_rate",
            "2e-3",
            "--lr_warmup_steps",
            "0",
            "--repa_weight",
            "0",
        )
    )
    trained = SSDDAutoencoder.from_pretrained(out)
    after = fixed_multiscale_loss(trained, images, 2)
    print(f"fixed-draw multi-scale FM loss: {before:.4f} -> {after:.4f} (ratio {after / before:.3f})")
    assert after < 0.7 * before
    assert trained.config.multiscale_stages == 2
    z = trained.encode(images[:1]).latent_dist.mode()
    assert torch.isfinite(trained.decode(z).sample).all()  # decodes coarse-to-fine by default
