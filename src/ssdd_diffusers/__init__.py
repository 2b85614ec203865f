"""SSDD (Single-Step Diffusion Decoder) autoencoders for the Hugging Face diffusers ecosystem."""

from diffusers.models.modeling_utils import ModelMixin  # lets DiffusionPipeline load components from here

from .models import SSDDAutoencoder, UViTDecoder
from .presets import DECODER_SIZES, decoder_preset, encoder_preset
from .sampling import euler_sample, flow_time_grid

__version__ = "0.1.0"

__all__ = [
    "DECODER_SIZES",
    "ModelMixin",
    "SSDDAutoencoder",
    "UViTDecoder",
    "decoder_preset",
    "encoder_preset",
    "euler_sample",
    "flow_time_grid",
]
