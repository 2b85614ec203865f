"""Decode (and encode) speed and memory: SSDD presets against diffusers' AutoencoderKL and
ConsistencyDecoderVAE, on identical latents, in one process, interleaved and repeated.

A thin wrapper around :mod:`ssdd_diffusers.cli.benchmark` (also available as ``ssdd-diffusers benchmark``
with the same flags); see that module for how timing and peak memory are measured.

Example::

    python benchmarks/decode_benchmark.py --resolutions 256 512 1024 \
        --contenders ssdd-S-1 ssdd-B-1 ssdd-M-1 ssdd-S-12 kl consistency \
        --json benchmarks/results/decode_cpu.json --markdown benchmarks/results/decode_cpu.md
"""

from __future__ import annotations

from ssdd_diffusers.cli.benchmark import (
    SD_VAE_CONFIG,
    SLOW_CONTENDERS,
    Contender,
    build_contender,
    gflop_count,
    main,
    matmul_gflops,
    measure_memory_here,
    memory_in_child,
    memory_report,
    parse_args,
    parse_ssdd,
    run_benchmark,
    timed,
    to_markdown,
)

__all__ = [
    "SD_VAE_CONFIG",
    "SLOW_CONTENDERS",
    "Contender",
    "build_contender",
    "gflop_count",
    "main",
    "matmul_gflops",
    "measure_memory_here",
    "memory_in_child",
    "memory_report",
    "parse_args",
    "parse_ssdd",
    "run_benchmark",
    "timed",
    "to_markdown",
]

if __name__ == "__main__":
    main()
