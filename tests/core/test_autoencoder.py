"""diffusers-style model tests for SSDDAutoencoder (save/load, dtypes, determinism, slicing, tiling,
gradient checkpointing, training, EMA), on tiny configurations."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.training_utils import EMAModel
from helpers.configs import FIXTURES, perturb_, tiny_autoencoder_kl, tiny_config
from torch import nn

from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.models.uvit_decoder import GEGLUFeedForward, SSDDResnetBlock


def images(batch=2, height=32, width=32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def latents(vae, batch=2, height=8, width=8, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vae.config.latent_channels, height, width, generator=generator)


# ------------------------------------------------------------------------------------------------
# API and outputs
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_output_types_and_shapes(tiny_vae):
    x = images(2, 32, 48)
    out = tiny_vae.encode(x)
    assert isinstance(out, AutoencoderKLOutput)
    assert isinstance(out.latent_dist, DiagonalGaussianDistribution)
    z = out.latent_dist.mode()
    assert z.shape == (2, 4, 8, 12)
    decoded = tiny_vae.decode(z)
    assert isinstance(decoded, DecoderOutput) and decoded.sample.shape == (2, 3, 32, 48)
    assert tiny_vae.forward(x).sample.shape == x.shape
    velocity = tiny_vae.decoder(decoded.sample, torch.tensor([0.3, 0.7]), z)
    assert velocity.shape == x.shape


@torch.no_grad()
def test_return_dict_equivalence(tiny_vae):
    x = images()
    z = tiny_vae.encode(x).latent_dist.mode()
    (posterior,) = tiny_vae.encode(x, return_dict=False)
    assert torch.equal(posterior.mode(), z)
    (sample,) = tiny_vae.decode(z, return_dict=False)
    assert torch.equal(sample, tiny_vae.decode(z).sample)
    assert torch.equal(tiny_vae(x, return_dict=False)[0], tiny_vae(x).sample)


@torch.no_grad()
def test_forward_is_encode_then_decode(tiny_vae):
    x = images()
    z = tiny_vae.encode(x).latent_dist.mode()
    assert torch.equal(tiny_vae(x).sample, tiny_vae.decode(z).sample)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sampled = tiny_vae(x, sample_posterior=True, generator=g1).sample
    z_sampled = tiny_vae.encode(x).latent_dist.sample(generator=g2)
    assert torch.equal(sampled, tiny_vae.decode(z_sampled, generator=g2).sample)
    assert not torch.equal(sampled, tiny_vae(x).sample)


@torch.no_grad()
def test_one_step_decode_is_noise_plus_velocity(tiny_vae):
    z = latents(tiny_vae)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = noise + tiny_vae.decoder(noise, 1.0, z)  # decode passes its times as Python numbers
    decoded = tiny_vae.decode(z, noise=noise, num_inference_steps=1).sample
    assert torch.equal(decoded, expected)
    # a per-image time tensor computes the time embedding per row: the same up to float rounding
    torch.testing.assert_close(
        decoded, noise + tiny_vae.decoder(noise, torch.ones(2), z), rtol=1e-5, atol=1e-5
    )


@torch.no_grad()
def test_steps_default_from_config(tiny_vae):
    z = latents(tiny_vae)
    default = tiny_vae.decode(z).sample
    assert torch.equal(
        default, tiny_vae.decode(z, num_inference_steps=tiny_vae.config.num_inference_steps).sample
    )
    assert not torch.allclose(default, tiny_vae.decode(z, num_inference_steps=1).sample)


# ------------------------------------------------------------------------------------------------
# Determinism and noise
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_determinism_without_generator(tiny_vae):
    z = latents(tiny_vae)
    first = tiny_vae.decode(z).sample
    assert torch.equal(first, tiny_vae.decode(z).sample)
    # sample 0 gets the same default noise whatever the batch size
    assert torch.allclose(tiny_vae.decode(z[:1]).sample, first[:1], atol=1e-5)


@torch.no_grad()
def test_generator_controls_noise(tiny_vae):
    z = latents(tiny_vae)
    a = tiny_vae.decode(z, generator=torch.Generator().manual_seed(1)).sample
    b = tiny_vae.decode(z, generator=torch.Generator().manual_seed(1)).sample
    c = tiny_vae.decode(z, generator=torch.Generator().manual_seed(2)).sample
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# Save / load / dtypes
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_save_load_roundtrip_safetensors(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path / "config.json").exists()
    loaded = SSDDAutoencoder.from_pretrained(tmp_path).eval()

    def normalise(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert normalise(loaded.config) == normalise(tiny_vae.config)
    z = latents(tiny_vae)
    assert (loaded.decode(z).sample - tiny_vae.decode(z).sample).abs().max() < 5e-5


@torch.no_grad()
def test_fp16_variant_roundtrip(tiny_vae, tmp_path):
    tiny_vae.to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").exists()
    loaded = SSDDAutoencoder.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16
    with pytest.raises(OSError):
        SSDDAutoencoder.from_pretrained(tmp_path)  # no default-variant weights were saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.no_grad()
def test_reload_with_torch_dtype(tiny_vae, tmp_path, dtype):
    tiny_vae.save_pretrained(tmp_path)
    loaded = SSDDAutoencoder.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    assert all(p.dtype == dtype for p in loaded.parameters())
    x = images(1)
    z = loaded.encode(x.to(dtype)).latent_dist.mode()
    out = loaded.decode(z).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype != torch.float32:
        reference = tiny_vae.decode(tiny_vae.encode(x).latent_dist.mode()).sample
        assert (out.float() - reference).abs().mean() < 0.05


def test_half_precision_decodes_large_latents_at_1024px():
    """fp16 / bf16 decodes of latents 30x larger than unit variance at 1024 px: finite, and as close to
    float32 as the dtype test above asks (mean absolute difference < 0.05, the output being ~1)."""
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(block_out_channels=(32, 32, 32, 32))), scale=0.05).eval()
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 128, 128, generator=generator) * 30
    noise = torch.randn(1, 3, 1024, 1024, generator=generator)
    with torch.no_grad():
        reference = vae.decode(z, num_inference_steps=1, noise=noise).sample
        assert reference.abs().max() > 1
        for dtype in (torch.float16, torch.bfloat16):
            half = nn.Module.to(vae, dtype)
            out = half.decode(z.to(dtype), num_inference_steps=1, noise=noise.to(dtype)).sample
            assert out.dtype == dtype and torch.isfinite(out).all(), dtype
            assert (out.float() - reference).abs().mean() < 0.05, dtype
            vae = nn.Module.to(half, torch.float32)


def test_from_pretrained_rejects_other_class(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32,), norm_num_groups=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="AutoencoderKL config, not an SSDDAutoencoder"):
        SSDDAutoencoder.from_pretrained(tmp_path)


def tiny_kl(**overrides):
    kl = tiny_autoencoder_kl(scaling_factor=overrides.pop("scaling_factor", 0.18215), **overrides)
    with torch.no_grad():  # non-trivial weights everywhere (diffusers zero-inits nothing here, but be sure)
        for p in kl.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return kl


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SD-VAE layout
        {"scaling_factor": 0.13025, "force_upcast": False},  # SDXL-VAE values
        {  # SD3/FLUX-style: 16 channels, no quant_conv, shift factor
            "latent_channels": 16,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "scaling_factor": 1.5305,
            "shift_factor": 0.0609,
        },
        {"latents_mean": (0.1, -0.2, 0.3, 0.0), "latents_std": (1.5, 2.0, 0.5, 1.0)},
    ],
)
@torch.no_grad()
def test_from_autoencoder_kl_gives_identical_posteriors(overrides):
    kl = tiny_kl(**overrides)
    vae = SSDDAutoencoder.from_autoencoder_kl(kl, decoder="XS").eval()
    x = images(2)
    ours, theirs = vae.encode(x).latent_dist, kl.encode(x).latent_dist
    assert theirs.std.min() < 0.999 or theirs.mean.abs().max() > 1e-3  # a non-degenerate posterior
    torch.testing.assert_close(ours.mean, theirs.mean, atol=0, rtol=0)
    torch.testing.assert_close(ours.logvar, theirs.logvar, atol=0, rtol=0)
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "latent_channels"):
        expected = kl.config[key]
        expected = tuple(expected) if isinstance(expected, list) else expected
        got = vae.config[key]
        assert (tuple(got) if isinstance(got, list) else got) == expected, key
    assert vae.decode(ours.mode()).sample.shape == x.shape
    assert (
        vae.config.decoder_block_out_channels
        == SSDDAutoencoder.from_preset(decoder="XS").config["decoder_block_out_channels"]
    )


def test_from_autoencoder_kl_survives_save_and_reload(tmp_path):
    kl = tiny_kl(shift_factor=0.25)
    vae = SSDDAutoencoder.from_autoencoder_kl(kl, decoder="XS", num_inference_steps=1)
    vae.save_pretrained(tmp_path)
    reloaded = SSDDAutoencoder.from_pretrained(tmp_path).eval()
    assert reloaded.config.shift_factor == 0.25 and reloaded.config.num_inference_steps == 1
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.encode(x).latent_dist.mean, kl.encode(x).latent_dist.mean, atol=0, rtol=0
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"act_fn": "gelu"}, "act_fn must be 'silu'"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention=False"),
    ],
)
def test_from_autoencoder_kl_rejects_incompatible_encoders(overrides, message):
    with pytest.raises(ValueError, match=message):
        SSDDAutoencoder.from_autoencoder_kl(tiny_kl(**overrides), decoder="XS")


def test_from_autoencoder_kl_rejects_other_models():
    with pytest.raises(TypeError, match="expects a diffusers.AutoencoderKL; got SSDDAutoencoder"):
        SSDDAutoencoder.from_autoencoder_kl(SSDDAutoencoder.from_preset(decoder="XS"))


def upstream_m_state() -> dict[str, torch.Tensor]:
    """Zero tensors with every key and shape of the released f8c4 + M upstream checkpoint."""
    state = {}
    for line in (FIXTURES / "upstream_ssdd_f8c4_M_state_dict.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            state[key] = torch.zeros(eval(shape))
    return state


def test_upstream_m_checkpoint_layout_maps_one_to_one():
    """Every key of the released f8c4 + M checkpoint loads, and the inferred config is the M preset."""
    state = upstream_m_state()
    assert len(state) == 536
    vae = SSDDAutoencoder.from_upstream_checkpoint(state)
    preset = SSDDAutoencoder.from_preset("f8c4", decoder="M")
    for key in (
        "block_out_channels",
        "decoder_block_out_channels",
        "decoder_transformer_layers",
        "decoder_attention_heads",
        "decoder_attention_window",
        "layers_per_block",
        "latent_channels",
    ):
        assert vae.config[key] == preset.config[key], key


UPSTREAM_EXPECTED = "Expected the upstream SSDD layout"


def test_upstream_loader_rejects_a_diffusers_format_state_dict(tiny_vae, tmp_path):
    """Weights already in the diffusers layout (``SSDDAutoencoder.state_dict()`` or its saved safetensors)
    give a ValueError naming what they are and what to do, not an IndexError from config inference."""
    from ssdd_diffusers.conversion import infer_upstream_config

    tiny_vae.save_pretrained(tmp_path)
    for source in (tiny_vae.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(ValueError) as err:
            SSDDAutoencoder.from_upstream_checkpoint(source)
        message = str(err.value)
        assert message.startswith("Not an upstream SSDD checkpoint: this looks like a diffusers-format")
        assert "SSDDAutoencoder.from_pretrained" in message
        assert UPSTREAM_EXPECTED in message and "'encoder.down.0.block.0.conv1.weight'" in message
    with pytest.raises(ValueError, match="diffusers-format SSDDAutoencoder state dict"):
        infer_upstream_config(tiny_vae.state_dict())


@pytest.mark.parametrize(
    "case, found",
    [
        ("autoencoder_kl", "diffusers AutoencoderKL state dict, which has no SSDD decoder"),
        ("other_encoder_decoder", "keys start with ['decoder.0', 'encoder.0']"),
        ("no_encoder_or_decoder", "could not find SSDD weights ('encoder.*' / 'decoder.*' keys)"),
        ("truncated_upstream", "Incomplete or malformed upstream SSDD checkpoint (missing 'encoder.down.1"),
    ],
)
def test_upstream_loader_rejects_unrelated_weights(case, found):
    """Other weights: a ValueError that says what was expected and what was found."""
    if case == "autoencoder_kl":
        state = tiny_kl().state_dict()
    elif case == "other_encoder_decoder":
        state = torch.nn.ModuleDict({"encoder": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))}).state_dict()
        state |= {"decoder.0.weight": torch.zeros(3, 4, 1, 1)}
    elif case == "no_encoder_or_decoder":
        state = torch.nn.Linear(2, 2).state_dict()
    else:
        state = {k: v for k, v in upstream_m_state().items() if not k.startswith("encoder.down.1.block.0.")}
    with pytest.raises(ValueError) as err:
        SSDDAutoencoder.from_upstream_checkpoint(state)
    message = str(err.value)
    assert found in message, message
    assert UPSTREAM_EXPECTED in message and "relative_bias_table" in message


# ------------------------------------------------------------------------------------------------
# Slicing and tiling
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_slicing_equivalence(tiny_vae):
    x = images(3)
    z = tiny_vae.encode(x).latent_dist.mode()
    reference = tiny_vae.decode(z).sample
    tiny_vae.enable_slicing()
    assert torch.allclose(tiny_vae.encode(x).latent_dist.mode(), z, atol=1e-5)
    assert torch.allclose(tiny_vae.decode(z).sample, reference, atol=1e-5)
    tiny_vae.disable_slicing()
    assert torch.allclose(tiny_vae.decode(z).sample, reference, atol=1e-6)


@torch.no_grad()
def test_tiling_equivalence_non_square_several_tiles():
    """Default tiles (sample_size = 64 px, 25% overlap) on a 96x160 image: 2 x 3 tiles, blended."""
    torch.manual_seed(0)
    vae = SSDDAutoencoder(**tiny_config(sample_size=64)).eval()  # upstream initialisation
    x = images(1, 96, 160, seed=3)
    z = vae.encode(x).latent_dist.mode()
    reference = vae.decode(z).sample
    vae.enable_tiling()
    tiled = vae.decode(z).sample
    z_tiled = vae.encode(x).latent_dist.mode()
    diff = (tiled - reference).abs()
    assert tiled.shape == reference.shape
    assert diff.max() < 0.5 and diff.mean() < 0.05, (diff.max(), diff.mean())  # measured 0.41 / 0.038
    assert (z_tiled - z).abs().max() < 0.5
    # pooled GroupNorm statistics reduce tile-to-tile tone shifts
    vae.enable_tiling(share_norm_stats=False)
    unshared = (vae.decode(z).sample - reference).abs().mean()
    assert diff.mean() < 0.85 * unshared, (diff.mean(), unshared)  # measured 0.038 vs 0.053
    vae.disable_tiling()
    assert torch.equal(vae.decode(z).sample, reference)


@torch.no_grad()
def test_tiled_decode_pools_statistics_in_every_memory_format(monkeypatch):
    """Every GroupNorm of the decoder takes the pooled statistics from the provider, in both passes, also
    on NCHW (where the time-modulated GroupNorm is fused into one functional call), and no module hook
    is installed on the decoder's norms (hooks would leak into other threads decoding with the model)."""
    from ssdd_diffusers import tiling

    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config(sample_size=64)), scale=0.1).eval()
    z = vae.encode(images(1, 96, 160, seed=3)).latent_dist.mode()
    vae.enable_tiling()
    norms = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    provide = tiling.SharedGroupNormStats.__call__
    decoded, calls = {}, {}
    for channels_last in (True, False):
        vae.decoder.channels_last = channels_last
        seen = collections.Counter()

        def counting(self, norm, x, seen=seen):
            seen[(id(norm), self.mode)] += 1
            assert not norm._forward_hooks
            return provide(self, norm, x)

        monkeypatch.setattr(tiling.SharedGroupNormStats, "__call__", counting)
        decoded[channels_last] = vae.decode(z, generator=torch.Generator().manual_seed(0)).sample
        calls[channels_last] = seen
    assert {key for key, _ in calls[True]} == {id(norm) for norm in norms}  # every GroupNorm
    assert {mode for _, mode in calls[True]} == {"record", "apply"}
    assert calls[False] == calls[True]
    assert len(set(calls[True].values())) == 1  # each norm consulted once per tile and pass, no more
    torch.testing.assert_close(decoded[False], decoded[True], atol=1e-5, rtol=1e-5)


def test_enable_tiling_validates_arguments(tiny_vae):
    with pytest.raises(ValueError, match="multiple of"):
        tiny_vae.enable_tiling(tile_sample_min_size=50)
    with pytest.raises(ValueError, match="tile_overlap_factor"):
        tiny_vae.enable_tiling(tile_overlap_factor=1.5)


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(32, 32), (32, 64), (64, 32), (48, 80)])
@torch.no_grad()
def test_any_size_divisible_by_encoder_factor(tiny_vae, height, width):
    x = images(1, height, width)
    z = tiny_vae.encode(x).latent_dist.mode()
    out = tiny_vae.decode(z, num_inference_steps=1).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


@torch.no_grad()
def test_f8_preset_decodes_32px():
    vae = SSDDAutoencoder.from_preset("f8c4", decoder="XS", block_out_channels=(32, 32, 32, 32)).eval()
    out = vae(images(1, 32, 32), num_inference_steps=1).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_input_validation_errors(tiny_vae):
    with pytest.raises(ValueError, match="3 channels; got 4"):
        tiny_vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        tiny_vae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 4; got 30x32"):
        tiny_vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="4 channels; got 3"):
        tiny_vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        tiny_vae.decode(torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"noise must have shape \(1, 3, 32, 32\)"):
        tiny_vae.decode(torch.zeros(1, 4, 8, 8), noise=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1; got 0"):
        tiny_vae.decode(torch.zeros(1, 4, 8, 8), num_inference_steps=0)
    with pytest.raises(ValueError, match="multiples of 8; got 36x32"):
        tiny_vae.decoder(torch.zeros(1, 3, 36, 32), torch.ones(1), torch.zeros(1, 4, 9, 8))
    with pytest.raises(ValueError, match="z must be"):
        tiny_vae.decoder(torch.zeros(1, 3, 32, 32), torch.ones(1), torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="x_t must be"):
        tiny_vae.decoder(torch.zeros(1, 4, 32, 32), torch.ones(1), torch.zeros(1, 4, 8, 8))


def test_preset_errors():
    with pytest.raises(ValueError, match="Unknown decoder size"):
        SSDDAutoencoder.from_preset("f8c4", decoder="XXL")
    with pytest.raises(ValueError, match="f8c4"):
        SSDDAutoencoder.from_preset("8c4")
    with pytest.raises(ValueError, match="power of two"):
        SSDDAutoencoder.from_preset("f6c4")


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------


def test_every_residual_branch_starts_at_zero():
    """reset_parameters (run in __init__) zero-initialises the last layer of every residual branch (ResNet
    conv2, feed-forward proj_out) at any depth: three ResNets per down level, four per up level."""
    torch.manual_seed(0)
    vae = SSDDAutoencoder(**tiny_config(decoder_layers_per_block=3))
    resnets = {n: m for n, m in vae.decoder.named_modules() if isinstance(m, SSDDResnetBlock)}
    feed_forwards = {n: m for n, m in vae.decoder.named_modules() if isinstance(m, GEGLUFeedForward)}
    levels = len(vae.config.decoder_block_out_channels)
    assert len(resnets) == levels * 3 + levels * 4
    fourth = [n for n in resnets if n.endswith(".resnets.3")]
    assert fourth == [f"up_blocks.{i}.resnets.3" for i in range(levels)]
    assert len(feed_forwards) == vae.config.decoder_transformer_layers
    for name, block in resnets.items():
        assert torch.count_nonzero(block.conv2.weight) == 0, name
        assert torch.count_nonzero(block.conv1.weight) > 0, name
    for name, feed_forward in feed_forwards.items():
        assert torch.count_nonzero(feed_forward.proj_out.weight) == 0, name


# ------------------------------------------------------------------------------------------------
# Training behaviour
# ------------------------------------------------------------------------------------------------


def _fm_loss(vae: SSDDAutoencoder, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = vae.encode(x).latent_dist.sample(generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    t = torch.sigmoid(torch.randn(x.shape[0], generator=generator))
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    return ((vae.decoder(x_t, t, z) - (x - noise)) ** 2).mean()


def test_gradient_checkpointing_equivalence():
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config())).train()
    checkpointed = copy.deepcopy(vae)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    assert (
        checkpointed.decoder.gradient_checkpointing and checkpointed.decoder.mid_block.gradient_checkpointing
    )
    x = images(2)
    loss_a, loss_b = _fm_loss(vae, x), _fm_loss(checkpointed, x)
    loss_a.backward()
    loss_b.backward()
    assert abs(loss_a.item() - loss_b.item()) < 1e-5
    for (name, a), b in zip(vae.named_parameters(), checkpointed.parameters()):
        assert (a.grad - b.grad).abs().max() < 5e-5, name


def test_training_step_reduces_loss_and_updates_bias_tables():
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config())).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = images(2)
    table = vae.decoder.mid_block.transformer_blocks[0].relative_position_bias.relative_bias_table
    before_table = table.detach().clone()
    with torch.no_grad():  # a no-grad call first (upstream would cache a detached bias here)
        vae.decode(vae.encode(x).latent_dist.mode(), num_inference_steps=1)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = _fm_loss(vae, x)
        loss.backward()
        assert table.grad is not None and table.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(table.detach(), before_table)


def test_ema_step_tracks_weights():
    torch.manual_seed(0)
    vae = perturb_(SSDDAutoencoder(**tiny_config()))
    ema = EMAModel(
        vae.parameters(),
        decay=0.5,
        min_decay=0.5,
        update_after_step=0,
        use_ema_warmup=False,
        model_cls=SSDDAutoencoder,
        model_config=vae.config,
    )
    ema.step(vae.parameters())  # diffusers' EMA copies the weights on its first step (decay 0)
    before = [p.detach().clone() for p in vae.parameters()]
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(1.0)
    ema.step(vae.parameters())
    shadow = ema.shadow_params
    for b, s, p in zip(before, shadow, vae.parameters()):
        assert torch.allclose(s, 0.5 * b + 0.5 * p.detach(), atol=1e-6)
    ema.copy_to(vae.parameters())
    assert torch.allclose(next(vae.parameters()), shadow[0])
