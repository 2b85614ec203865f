"""Side-by-side reconstruction evaluation of SSDD models and any diffusers autoencoder.

* :mod:`.specs`: model specs (``[kind:]path[@steps=N][@label=NAME][@subfolder=DIR]``), locating and
  loading saved models;
* :mod:`.reconstruction`: encode -> decode for any autoencoder;
* :mod:`.metrics`: PSNR, SSIM, LPIPS (:mod:`.lpips`) and rFID, computed as upstream SSDD does;
* :mod:`.memory`: peak memory of a call;
* :mod:`.report`: results, the Markdown table and the reconstruction grid;
* :mod:`.runner`: :func:`evaluate_models`, the loop over models and images;
* :mod:`.latent_stats`: latent mean / std for latent diffusion training.

Typical use::

    from ssdd_diffusers.evaluation import build_eval_dataset, evaluate_models, parse_model_spec

    dataset = build_eval_dataset(256, data_dir="val_images/", max_samples=1000)
    models = [parse_model_spec("ssdd-f8c4-M@steps=8"), "kl:stabilityai/sd-vae-ft-ema"]
    report = evaluate_models(models, dataset)
    report.save("eval_results/")  # metrics.json, metrics.md, reconstructions.png

Metrics need ``pip install 'ssdd-diffusers[eval]'``.
"""

from .memory import MEMORY_LABELS, PeakMemoryMeter
from .metrics import (
    METRIC_KEYS,
    FIDMetric,
    LPIPSMetric,
    MetricSettings,
    ReconstructionMetrics,
    build_metrics,
    load_feature_extractor,
    load_module,
    psnr,
    ssim,
    to_uint8,
)
from .reconstruction import decode_latents, encode_latents, is_ssdd, reconstruct
from .report import EvaluationReport, ModelResult, image_grid
from .runner import build_eval_dataset, evaluate_models, iterate_batches, shared_noise
from .specs import (
    KL_CLASS_NAME,
    SSDD_CLASS_NAME,
    LoadedAutoencoder,
    ModelSpec,
    detect_model_class,
    load_autoencoder,
    load_pretrained,
    locate_model,
    parse_model_spec,
)

__all__ = [
    "KL_CLASS_NAME",
    "MEMORY_LABELS",
    "METRIC_KEYS",
    "EvaluationReport",
    "FIDMetric",
    "LPIPSMetric",
    "LoadedAutoencoder",
    "MetricSettings",
    "ModelResult",
    "ModelSpec",
    "PeakMemoryMeter",
    "ReconstructionMetrics",
    "SSDD_CLASS_NAME",
    "build_eval_dataset",
    "build_metrics",
    "decode_latents",
    "detect_model_class",
    "encode_latents",
    "evaluate_models",
    "image_grid",
    "is_ssdd",
    "iterate_batches",
    "load_autoencoder",
    "load_feature_extractor",
    "load_module",
    "load_pretrained",
    "locate_model",
    "parse_model_spec",
    "psnr",
    "reconstruct",
    "shared_noise",
    "ssim",
    "to_uint8",
]
