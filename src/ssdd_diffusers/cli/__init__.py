"""The ``ssdd-diffusers`` command line (and the ``ssdd-evaluate`` / ``ssdd-latent-stats`` aliases).

An application on top of the library: :mod:`.main` dispatches the subcommands (:mod:`.reconstruct`,
:mod:`.latents`, :mod:`.convert`, :mod:`.evaluate`, :mod:`.stats`, and :mod:`.benchmark` with its
:mod:`.contenders`); :mod:`.images` reads and writes image and latent files; :mod:`.cpu_memory` tunes
glibc's allocator while a command runs.
"""

from .evaluate import build_evaluate_parser, evaluate_command, evaluate_main
from .main import build_parser, main
from .stats import build_latent_stats_parser, latent_stats_command, latent_stats_main

__all__ = [
    "build_evaluate_parser",
    "build_latent_stats_parser",
    "build_parser",
    "evaluate_command",
    "evaluate_main",
    "latent_stats_command",
    "latent_stats_main",
    "main",
]
