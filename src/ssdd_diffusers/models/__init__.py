from .autoencoder_ssdd import SSDDAutoencoder
from .local_attention import LocalSelfAttention, local_attention
from .uvit_decoder import UViTDecoder

__all__ = ["SSDDAutoencoder", "UViTDecoder", "LocalSelfAttention", "local_attention"]
