"""Decoder training throughput: images/s of one flow-matching step (forward + backward + AdamW update).

Measures the velocity network only (frozen encoder, so latents are random), with the fp32 flow-matching
loss; LPIPS and REPA, which add fixed-cost side networks, are left out. Warm-up steps, then the median
of ``--repeats`` steps; all (resolution, batch) cases are interleaved round-robin.

Example::

    python benchmarks/train_benchmark.py --resolutions 128 256 --batch-sizes 1 4 \
        --json benchmarks/results/train_cpu.json --markdown benchmarks/results/train_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssdd_diffusers import SSDDAutoencoder


def make_step(
    decoder: torch.nn.Module, optimizer: torch.optim.Optimizer | None, x0: torch.Tensor, z: torch.Tensor
):
    """One training step closure on fixed inputs; returns the loss value."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=gen)).to(x0.device)

    def step() -> float:
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        loss = F.mse_loss(decoder(x_t, t, z).float(), (x0 - noise).float())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            decoder.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="S")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-optimizer", action="store_true", help="forward + backward only")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    vae = SSDDAutoencoder.from_preset("f8c4", decoder=args.preset).to(device)
    decoder = vae.decoder.train()
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    net = torch.compile(decoder) if args.compile else decoder
    optimizer = None if args.no_optimizer else torch.optim.AdamW(decoder.parameters(), lr=1e-4)

    cases = {}
    for res in args.resolutions:
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(res + batch)
            x0 = torch.randn(batch, 3, res, res, generator=gen).clamp(-1, 1).to(device)
            z = torch.randn(batch, 4, res // 8, res // 8, generator=gen).to(device)
            cases[(res, batch)] = make_step(net, optimizer, x0, z)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for step in cases.values():
        for _ in range(args.warmup):
            step()
    times: dict[tuple[int, int], list[float]] = {k: [] for k in cases}
    for r in range(args.repeats):
        for key, step in cases.items():
            times[key].append(timed(step))
        print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in times.items()), file=sys.stderr)

    rows = []
    for (res, batch), ts in times.items():
        med = statistics.median(ts)
        rows.append(
            {
                "preset": args.preset,
                "resolution": res,
                "batch": batch,
                "step_s_median": round(med, 4),
                "step_s_all": [round(t, 4) for t in ts],
                "images_per_s": round(batch / med, 3),
            }
        )
    meta = {
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "dtype": "fp32",
        "optimizer": None if args.no_optimizer else "AdamW",
        "loss": "flow-matching MSE (no LPIPS/REPA)",
        "gradient_checkpointing": args.gradient_checkpointing,
        "compile": args.compile,
        "loadavg": os.getloadavg(),
    }
    lines = [
        f"Decoder {args.preset} training step (forward + backward"
        f"{'' if args.no_optimizer else ' + AdamW'}), torch {meta['torch']}, {args.device} "
        f"({meta['threads']} threads), fp32, median of {args.repeats}.",
        "",
        "| res | batch | step ms | images/s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['resolution']} | {r['batch']} | {r['step_s_median'] * 1000:.0f} | {r['images_per_s']:.2f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
