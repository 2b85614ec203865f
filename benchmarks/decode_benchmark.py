"""Decode (and encode) speed and memory: SSDD presets against diffusers' AutoencoderKL, AutoencoderTiny,
AutoencoderDC and ConsistencyDecoderVAE, on identical latents, in one process, interleaved and repeated. A
contender that fails is recorded with its error message and the others still run.

A thin wrapper around :mod:`ssdd_diffusers.cli.benchmark` (also available as ``ssdd-diffusers benchmark``
with the same flags); see that module for how timing and peak memory are measured.

Example::

    python benchmarks/decode_benchmark.py --resolutions 256 512 1024 \
        --contenders ssdd-S-1 ssdd-B-1 ssdd-M-1 ssdd-S-12 kl consistency \
        --json benchmarks/results/decode_cpu.json --markdown benchmarks/results/decode_cpu.md
"""

from __future__ import annotations

from ssdd_diffusers.cli.benchmark import main

if __name__ == "__main__":
    main()
