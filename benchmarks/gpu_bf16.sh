#!/usr/bin/env bash
# GPU check for the decode benchmark: bf16, 256 px, batch 64, SSDD S/B/M (1 step) against AutoencoderKL
# (SD-VAE config), eager and torch.compile'd, plus the device's measured bf16 matmul ceiling and a
# CUDA-vs-CPU / bf16-vs-fp32 agreement check. The eager run also times the opt-in Triton norm kernels
# (``ssdd-*-fused`` contenders, ``decoder.fused_norm_kernels``), checked against the PyTorch path first.
# Results land in $OUT (default benchmarks/results). PROFILE=1 adds a CUDA kernel profile of the
# compiled SSDD-S decode.
#   bash benchmarks/gpu_bf16.sh            # needs: CUDA torch, diffusers, ssdd_diffusers importable
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export BATCH=${BATCH:-64}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 - <<'PY' | tee "$OUT/gpu_env.json"
import json, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
for _ in range(3):
    a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    a @ b
end.record()
torch.cuda.synchronize()
tflops = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                  "bf16_matmul_8192_tflops": round(tflops, 1)}))
PY
python3 - <<'PY' | tee "$OUT/gpu_agreement.json"
import json, torch
from ssdd_diffusers import SSDDAutoencoder
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
vae = SSDDAutoencoder.from_preset("f8c4", decoder="S").eval()
z = torch.randn(2, 4, 32, 32)
g = lambda d: torch.Generator(d).manual_seed(0)
with torch.no_grad():
    noise = torch.randn(2, 3, 256, 256, generator=g("cpu"))
    cpu = vae.decoder(noise, torch.ones(2), z)
    vae = vae.cuda()
    gpu = vae.decoder(noise.cuda(), torch.ones(2, device="cuda"), z.cuda()).cpu()
    vae = vae.to(torch.bfloat16)
    bf = vae.decoder(noise.cuda().bfloat16(), torch.ones(2, device="cuda").bfloat16(), z.cuda().bfloat16())
    vae.decoder.fused_norm_kernels = True
    bf_fused = vae.decoder(noise.cuda().bfloat16(), torch.ones(2, device="cuda").bfloat16(), z.cuda().bfloat16())
    bf, bf_fused = bf.float().cpu(), bf_fused.float().cpu()
scale = cpu.abs().max().item()
print(json.dumps({"cuda_fp32_vs_cpu_max_abs": (gpu - cpu).abs().max().item(),
                  "bf16_fused_norms_vs_bf16_max_abs": (bf_fused - bf).abs().max().item(),
                  "bf16_fused_norms_vs_fp32_rel_rms":
                      ((bf_fused - cpu).pow(2).mean().sqrt() / cpu.pow(2).mean().sqrt()).item(),
                  "bf16_vs_fp32_max_abs": (bf - cpu).abs().max().item(),
                  "bf16_vs_fp32_rel_rms": ((bf - cpu).pow(2).mean().sqrt() / cpu.pow(2).mean().sqrt()).item(),
                  "output_max_abs": scale}))
PY
common=(--device cuda --dtype bf16 --resolutions 256 --batch-sizes "$BATCH" --repeats 10 --warmup 3 --flops)
timeout 240 python3 benchmarks/decode_benchmark.py "${common[@]}" \
  --contenders ssdd-S-1 ssdd-S-1-fused ssdd-B-1 ssdd-B-1-fused ssdd-M-1 ssdd-M-1-fused kl \
  --json "$OUT/decode_gpu_bf16_eager.json" --markdown "$OUT/decode_gpu_bf16_eager.md"
timeout 300 python3 benchmarks/decode_benchmark.py "${common[@]}" --compile \
  --contenders ssdd-S-1 ssdd-B-1 ssdd-M-1 kl \
  --json "$OUT/decode_gpu_bf16_compiled.json" --markdown "$OUT/decode_gpu_bf16_compiled.md"
if [ "${PROFILE:-0}" = 1 ]; then
timeout 240 python3 - <<'PY' > "$OUT/gpu_profile_ssdd_S_compiled_bf16_b${BATCH}.txt"
import os, torch
from torch.profiler import ProfilerActivity, profile
from ssdd_diffusers import SSDDAutoencoder
vae = SSDDAutoencoder.from_preset("f8c4", decoder="S").to("cuda", torch.bfloat16).eval()
vae.decoder = torch.compile(vae.decoder, dynamic=False)
z = torch.randn(int(os.environ.get("BATCH", 64)), 4, 32, 32, device="cuda", dtype=torch.bfloat16)
with torch.inference_mode():
    for _ in range(3):
        vae.decode(z, num_inference_steps=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            vae.decode(z, num_inference_steps=1)
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))
PY
fi
