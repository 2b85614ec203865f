#!/usr/bin/env bash
# GPU measurement of the decoders in bf16, prepared to run once on a lent GPU machine (about 10 minutes):
#   1. the device and its measured bf16 matmul ceiling (gpu_env.json);
#   2. numerics: CUDA fp32 vs CPU, bf16 and fp16 vs fp32 for the PyTorch, channels_last and Triton paths,
#      and no NaN/inf in fp16/bf16 decodes at 1024 px from large-magnitude latents (gpu_agreement.json);
#   3. eager, like against like: SSDD S/B/M one step (NCHW PyTorch, channels_last PyTorch, channels_last +
#      Triton norm kernels) against AutoencoderKL (SD-VAE config), AutoencoderTiny (TAESD) and
#      AutoencoderDC (f32c32), at 256 px batch 64 and 1024 px batch 4, with peak memory;
#   4. compiled, like against like (torch.compile of every decoder), at both sizes, and CUDA graphs for
#      small batches (mode="reduce-overhead", 256 px batch 4; the decoder's caches are bypassed when
#      compiled, so the captured graph holds no Python-side state);
#   5. a CUDA kernel profile of the fastest SSDD-S path found in 3-4.
# Every step has its own timeout, so one failure does not lose the others. Results land in $OUT (default
# benchmarks/results):
#   bash benchmarks/gpu_bf16.sh          # needs: CUDA torch, diffusers, triton, ssdd_diffusers importable
# QUICK=1 keeps 256 px and the S decoder only (about 4 minutes). DRY_RUN=1 runs every step on the CPU at
# 64 px, batch 1 (Triton through its interpreter), to check the script itself before spending GPU time.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export DEVICE=cuda MATMUL=8192 BIG=128 AGREE=256 PRESET=S
SIZES=("256:64" "1024:4")
TIMING=(--repeats 10 --warmup 3)
if [ "${DRY_RUN:-0}" = 1 ]; then
  export DEVICE=cpu MATMUL=512 BIG=8 AGREE=32 PRESET=XS TRITON_INTERPRET=1
  SIZES=("64:1")
  TIMING=(--repeats 1 --warmup 0 --no-memory)  # CPU memory runs one child process per contender
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

timeout 60 "$PYTHON" - <<'PY' | tee "$OUT/gpu_env.json"
import json, os, time, torch
from ssdd_diffusers.torch_utils import synchronize
device, size = os.environ["DEVICE"], int(os.environ["MATMUL"])
a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
b = torch.randn_like(a)
for _ in range(3):
    a @ b
synchronize(device)
start = time.perf_counter()
for _ in range(10):
    a @ b
synchronize(device)
tflops = 10 * 2 * size**3 / (time.perf_counter() - start) / 1e12
name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
print(json.dumps({"torch": torch.__version__, "gpu": name, f"bf16_matmul_{size}_tflops": round(tflops, 2)}))
PY

timeout 300 "$PYTHON" - <<'PY' | tee "$OUT/gpu_agreement.json"
import json, os, torch
from ssdd_diffusers import SSDDAutoencoder
device, big_size, size = os.environ["DEVICE"], int(os.environ["BIG"]), int(os.environ["AGREE"])
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
vae = SSDDAutoencoder.from_preset("f8c4", decoder=os.environ["PRESET"]).eval()
z = torch.randn(2, 4, size // 8, size // 8)
noise = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
ones = torch.ones(2)
result = {}
with torch.no_grad():
    cpu = vae.decoder(noise, ones, z)
    vae = vae.to(device)
    on_device = vae.decoder(noise.to(device), ones.to(device), z.to(device)).cpu()
    result["device_fp32_vs_cpu_max_abs"] = (on_device - cpu).abs().max().item()
    for dtype in (torch.bfloat16, torch.float16):
        half = vae.to(dtype)
        for path, layout, fused in (("nchw", False, False), ("channels_last", True, False), ("fused", None, True)):
            half.decoder.channels_last, half.decoder.fused_norm_kernels = layout, fused
            inputs = (t.to(device=device, dtype=dtype) for t in (noise, ones, z))
            out = half.decoder(*inputs).float().cpu()
            name = f"{str(dtype)[6:]}_{path}"
            result[f"{name}_vs_fp32_rel_rms"] = ((out - cpu).pow(2).mean().sqrt() / cpu.pow(2).mean().sqrt()).item()
            result[f"{name}_vs_fp32_max_abs"] = (out - cpu).abs().max().item()
        # 1024 px (128 x 128 latents), latents 30x larger than unit variance: no overflow in half precision
        big = torch.randn(1, 4, big_size, big_size, device=device, dtype=dtype) * 30
        for fused in (False, True):
            half.decoder.channels_last, half.decoder.fused_norm_kernels = None, fused
            image = half.decode(big, num_inference_steps=1).sample
            result[f"{str(dtype)[6:]}_{big_size * 8}px_large_latents_finite{'_fused' if fused else ''}"] = bool(
                torch.isfinite(image).all()
            )
        vae = half.float()
print(json.dumps(result))
PY

SSDD=(ssdd-S-1 ssdd-S-1-cl ssdd-S-1-fused ssdd-B-1 ssdd-B-1-fused ssdd-M-1 ssdd-M-1-fused)
COMPILED=(ssdd-S-1 ssdd-B-1 ssdd-M-1)
if [ "${QUICK:-0}" = 1 ]; then SIZES=("256:64"); SSDD=(ssdd-S-1 ssdd-S-1-cl ssdd-S-1-fused); COMPILED=(ssdd-S-1); fi
if [ "${DRY_RUN:-0}" = 1 ]; then SSDD=(ssdd-S-1 ssdd-S-1-cl ssdd-XS-1-fused); COMPILED=(ssdd-XS-1); fi
for size in "${SIZES[@]}"; do
  res=${size%%:*}; batch=${size##*:}
  common=(--device "$DEVICE" --dtype bf16 --resolutions "$res" --batch-sizes "$batch" "${TIMING[@]}" --flops)
  timeout 300 "$PYTHON" benchmarks/decode_benchmark.py "${common[@]}" --contenders "${SSDD[@]}" kl tiny dc \
    --json "$OUT/decode_gpu_bf16_eager_${res}.json" --markdown "$OUT/decode_gpu_bf16_eager_${res}.md"
  timeout 600 "$PYTHON" benchmarks/decode_benchmark.py "${common[@]}" --compile --contenders "${COMPILED[@]}" kl tiny dc \
    --json "$OUT/decode_gpu_bf16_compiled_${res}.json" --markdown "$OUT/decode_gpu_bf16_compiled_${res}.md"
done
small=(--device "$DEVICE" --dtype bf16 --resolutions "${SIZES[0]%%:*}" --batch-sizes 4 "${TIMING[@]}")
timeout 300 "$PYTHON" benchmarks/decode_benchmark.py "${small[@]}" --compile --compile-mode reduce-overhead \
  --contenders "${COMPILED[0]}" kl --json "$OUT/decode_gpu_bf16_cudagraphs_b4.json" \
  --markdown "$OUT/decode_gpu_bf16_cudagraphs_b4.md"

timeout 240 "$PYTHON" - <<'PY' > "$OUT/gpu_profile_ssdd_S_fastest_bf16.txt"
# Profile whichever SSDD-S variant was fastest at 256 px (eager or compiled).
import json, os, torch
from torch.profiler import ProfilerActivity, profile
from ssdd_diffusers.cli.contenders import build_contender
out = os.environ.get("OUT", "benchmarks/results")
rows = []
size = 64 if os.environ["DEVICE"] == "cpu" else 256
batch = 1 if size == 64 else 64
for mode in ("eager", "compiled"):
    path = f"{out}/decode_gpu_bf16_{mode}_{size}.json"
    if os.path.exists(path):
        rows += [(r["decode_s_median"], r["contender"], mode) for r in json.load(open(path))["results"]
                 if r["contender"].startswith("ssdd-")]
small = [row for row in rows if row[1].startswith("ssdd-S-")]
_, name, mode = min(small or rows)  # the dry run times ssdd-XS only
device = torch.device(os.environ["DEVICE"])
c = build_contender(name, device, torch.bfloat16, False, "default" if mode == "compiled" else None)
z = c.latents(batch, size, device, torch.bfloat16)
print(f"fastest SSDD-S path: {name} ({mode})")
activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
with torch.inference_mode():
    for _ in range(3):
        c.decode(z)
    with profile(activities=[activity]) as prof:
        for _ in range(3):
            c.decode(z)
        torch.cuda.synchronize() if device.type == "cuda" else None
sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
PY
echo "done: $(ls "$OUT" | grep -c gpu) GPU result files in $OUT"
