"""Bad inputs against the Python API: each gets one ValueError / OSError that names the problem and what is
expected (NaN latents, empty batches, wrong shapes, 0 steps, empty image folders, too-small resolutions,
folders of another model class, truncated weights). The command line: ``tests/cli/test_cli_bad_inputs.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.bad_inputs import WEIGHTS, save_model_folders, truncate
from safetensors.torch import save_file

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.evaluation import build_eval_dataset, load_autoencoder, parse_model_spec
from ssdd_diffusers.models import autoencoder_ssdd
from ssdd_diffusers.training.arguments import parse_args
from ssdd_diffusers.weights_files import broken_weights_error, safetensors_problem

pytestmark = pytest.mark.usefixtures("single_thread")

EXTENSIONS = r"\(\.bmp, \.gif, \.jpeg, \.jpg, \.png, \.tif, \.tiff, \.webp\)"
NOT_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_model_folders(tmp_path_factory.mktemp("models"))


def _with(value: float, shape: tuple[int, ...]) -> torch.Tensor:
    """A random tensor with a single ``value`` in it."""
    x = torch.randn(shape)
    x[0, 0, 1, 2] = value
    return x


# ----------------------------------------------------------------------------------------------------
# encode / decode inputs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", NOT_FINITE, ids=str)
@torch.no_grad()
def test_decode_refuses_non_finite_latents(tiny_vae, value: float) -> None:
    with pytest.raises(ValueError, match="Latents contain NaN or infinite values; expected finite values"):
        tiny_vae.decode(_with(value, (2, 4, 8, 8)))


@pytest.mark.parametrize("value", NOT_FINITE, ids=str)
@torch.no_grad()
def test_encode_refuses_non_finite_images(tiny_vae, value: float) -> None:
    with pytest.raises(
        ValueError, match=r"Input images contain NaN or infinite values; expected finite pixel"
    ):
        tiny_vae.encode(_with(value, (2, 3, 32, 32)))


@torch.no_grad()
def test_finiteness_check_is_one_reduction_per_call(tiny_vae, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``isfinite`` per encode / decode call, also when slicing splits the batch."""
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: calls.append(tuple(x.shape)) or isfinite(x))
    tiny_vae.enable_slicing()
    tiny_vae(torch.rand(2, 3, 32, 32) * 2 - 1, num_inference_steps=1)
    assert calls == [(2, 3, 32, 32), (2, 4, 8, 8)]


@pytest.mark.parametrize("context", ["compiling", "capturing"])
@torch.no_grad()
def test_finiteness_check_skipped_while_compiling_or_capturing(
    tiny_vae, monkeypatch: pytest.MonkeyPatch, context: str
) -> None:
    """No host synchronisation inside torch.compile tracing or a CUDA-graph capture (faked here)."""
    if context == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    z = torch.full((1, 4, 8, 8), float("nan"))
    assert torch.isnan(tiny_vae.decode(z, num_inference_steps=1).sample).all()


@torch.no_grad()
def test_checked_encode_and_decode_compile_as_one_graph(tiny_vae, monkeypatch: pytest.MonkeyPatch) -> None:
    """fullgraph=True fails on any graph break, e.g. a ``bool(tensor)`` host synchronisation: the input
    checks of ``encode`` / ``decode`` add none. The networks and the sampler are stubbed out (their own
    graph breaks are theirs, and compiling them is slow)."""
    monkeypatch.setattr(tiny_vae, "_decode", lambda z, noise, steps, stages: noise * steps + z.mean())
    monkeypatch.setattr(
        tiny_vae, "_encode", lambda x: x.mean(1, keepdim=True)[..., ::4, ::4].repeat(1, 8, 1, 1)
    )
    z, noise, x = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32, 32), torch.rand(1, 3, 32, 32)

    def decode(z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return tiny_vae.decode(z, noise=noise, num_inference_steps=2, return_dict=False)[0]

    def encode(x: torch.Tensor) -> torch.Tensor:
        return tiny_vae.encode(x, return_dict=False)[0].mean

    compiled_decode = torch.compile(decode, fullgraph=True, backend="eager")
    compiled_encode = torch.compile(encode, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled_decode(z, noise), decode(z, noise))
    torch.testing.assert_close(compiled_encode(x), encode(x))
    assert torch.isnan(compiled_decode(torch.full_like(z, float("nan")), noise)).all()  # unchecked there
    assert torch.isnan(compiled_encode(torch.full_like(x, float("nan")))).all()


BAD_SHAPES = [
    (
        "decode",
        (0, 4, 8, 8),
        r"Latents must hold at least one item; got an empty batch \(shape \(0, 4, 8, 8\)\)",
    ),
    ("encode", (0, 3, 32, 32), r"Input images must hold at least one item; got an empty batch"),
    ("decode", (1, 3, 8, 8), r"Latents must have 4 channels; got 3 \(shape \(1, 3, 8, 8\)\)"),
    ("decode", (4, 8, 8), r"Latents must be a 4-D \(batch, channels, height, width\) tensor; got shape"),
    ("decode", (1, 1, 4, 8, 8), r"Latents must be a 4-D"),
    ("decode", (1, 4, 0, 8), r"Latents height and width must be at least 1; got 0x8"),
    ("encode", (1, 4, 32, 32), r"Input images must have 3 channels; got 4"),
    ("encode", (3, 32, 32), r"Input images must be a 4-D"),
    ("encode", (1, 3, 2, 2), r"Input images height and width must be positive multiples of 4; got 2x2"),
    ("encode", (1, 3, 0, 0), r"Input images height and width must be positive multiples of 4; got 0x0"),
    ("encode", (1, 3, 30, 32), r"positive multiples of 4; got 30x32"),
]


@pytest.mark.parametrize(
    "method, shape, message",
    BAD_SHAPES,
    ids=[f"{method}-{'x'.join(map(str, shape))}" for method, shape, _ in BAD_SHAPES],
)
@torch.no_grad()
def test_bad_shapes(tiny_vae, method: str, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        getattr(tiny_vae, method)(torch.zeros(shape))


def test_empty_batch_is_an_error_like_autoencoder_kl() -> None:
    """AutoencoderKL has no empty-batch support either (GroupNorm cannot reshape 0 elements)."""
    from helpers.configs import tiny_autoencoder_kl

    with pytest.raises(RuntimeError), torch.no_grad():
        tiny_autoencoder_kl().decode(torch.zeros(0, 4, 8, 8))


# ----------------------------------------------------------------------------------------------------
# num_inference_steps = 0
# ----------------------------------------------------------------------------------------------------
def test_zero_steps(tiny_vae, folders: dict[str, Path]) -> None:
    message = "num_inference_steps must be >= 1; got 0"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        tiny_vae.decode(torch.zeros(1, 4, 8, 8), num_inference_steps=0)
    from helpers.configs import tiny_config

    with pytest.raises(ValueError, match=message):
        SSDDAutoencoder(**tiny_config(num_inference_steps=0))
    with pytest.raises(ValueError, match=message):
        SSDDAutoencoder.from_pretrained(folders["steps0"])
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0 in 'model@steps=0'"):
        parse_model_spec("model@steps=0")
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1 or 'default', got 'two'"):
        parse_model_spec("model@steps=two")


# ----------------------------------------------------------------------------------------------------
# image folders and resolutions
# ----------------------------------------------------------------------------------------------------
def test_empty_image_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images {EXTENSIONS} found under {empty}"):
        build_eval_dataset(32, data_dir=str(empty))
    with pytest.raises(ValueError, match=f"no images {EXTENSIONS} found under --train_data_dir '{empty}'"):
        parse_args(["--train_data_dir", str(empty)])
    with pytest.raises(ValueError, match=f"--train_data_dir '{tmp_path / 'missing'}' is not a folder"):
        parse_args(["--train_data_dir", str(tmp_path / "missing")])


@pytest.mark.parametrize("resolution", [0, 4, -8, 12])
def test_training_resolution(resolution: int) -> None:
    with pytest.raises(ValueError, match=f"--resolution must be a positive multiple of 8; got {resolution}"):
        parse_args(["--sample_photos", "train", "--resolution", str(resolution)])


# ----------------------------------------------------------------------------------------------------
# model folders
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, message",
    [
        ("kl", "holds a AutoencoderKL config, not an SSDDAutoencoder. Load it with diffusers.AutoencoderKL"),
        ("unet", "holds a UNet2DModel config, not an SSDDAutoencoder. Load it with diffusers.UNet2DModel"),
    ],
)
def test_from_pretrained_refuses_another_class(folders: dict[str, Path], name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SSDDAutoencoder.from_pretrained(folders[name])


def test_from_pretrained_of_a_pipeline_folder(folders: dict[str, Path]) -> None:
    """diffusers' own message (no config.json); ``subfolder="vae"`` is the model of a pipeline."""
    with pytest.raises(OSError, match="no file named config.json"):
        SSDDAutoencoder.from_pretrained(folders["pipeline"])
    with pytest.raises(ValueError, match="holds a AutoencoderKL config"):
        SSDDAutoencoder.from_pretrained(folders["pipeline"], subfolder="vae")


def test_load_autoencoder_refuses_a_model_that_is_not_an_autoencoder(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=f"'{folders['unet']}' holds a UNet2DModel, not an autoencoder"):
        load_autoencoder(str(folders["unet"]))
    assert load_autoencoder(str(folders["pipeline"])).class_name == "AutoencoderKL"  # its vae/


# ----------------------------------------------------------------------------------------------------
# truncated weights
# ----------------------------------------------------------------------------------------------------
def test_safetensors_problem(folders: dict[str, Path], tmp_path: Path) -> None:
    assert safetensors_problem(folders["ssdd"] / WEIGHTS) is None
    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, str(tmp_path / "ok.safetensors"))
    assert safetensors_problem(tmp_path / "ok.safetensors") is None
    assert "where its header describes" in safetensors_problem(folders["truncated"] / WEIGHTS)
    assert "header alone claims" in safetensors_problem(truncate(tmp_path / "ok.safetensors", 0.1))
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    assert "shorter than the 8-byte header length" in safetensors_problem(tmp_path / "tiny.safetensors")
    header = json.dumps({"a": {"dtype": "F32", "shape": [1]}}).encode()  # no data_offsets
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    assert "malformed" in safetensors_problem(tmp_path / "bad.safetensors")
    assert broken_weights_error(ValueError("unrelated"), folders["ssdd"]) is None


def test_load_autoencoder_names_a_truncated_weights_file(folders: dict[str, Path]) -> None:
    weights = folders["truncated"] / WEIGHTS
    with pytest.raises(OSError, match=f"weights file '{weights}' is truncated or corrupt .*; re-download it"):
        load_autoencoder(str(folders["truncated"]))


def test_from_pretrained_names_a_truncated_weights_file(folders: dict[str, Path]) -> None:
    with pytest.raises(OSError, match="is truncated or corrupt"):
        SSDDAutoencoder.from_pretrained(folders["truncated"])


def test_check_image_is_untouched_by_finite_inputs() -> None:
    """The helpers accept what they should (no false positives)."""
    autoencoder_ssdd._check_image(torch.zeros(1, 4, 1, 1), 4, 1, "Latents")
    autoencoder_ssdd._check_finite(torch.zeros(1, 4, 1, 1), "Latents", "finite values")
    autoencoder_ssdd._check_finite(torch.empty(1, 4, 1, 1, device="meta"), "Latents", "finite values")
