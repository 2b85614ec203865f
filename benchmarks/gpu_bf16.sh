#!/usr/bin/env bash
# The prepared GPU measurement of the decoders (and of training) in bf16, sized to one device lease: it
# finishes within 8 minutes on an H200, compilation included. Every step runs under its own `timeout`; a
# step that fails or runs out of time is recorded and the next one still runs (no `set -e`). Inside a step,
# a contender or check that fails is recorded with its error message ({"error": ...}) and the others run.
#
# Step budget (seconds of wall time; each step is killed 3 s after its budget at the latest):
#   phase  step            budget  what
#   1      precompile        120   torch.compile of every compiled case below, 8 processes in parallel (the
#                                  timed steps then load the compiled code from Inductor's on-disk caches);
#          ‖ env              25   meanwhile: device, versions, bf16 matmul rate            (gpu_env.json)
#          ‖ agreement        90   then: bf16/fp16 vs fp32 for the default, NCHW, channels_last and Triton
#                                  paths, and no NaN/inf from large latents, at 256 and 1024 px
#                                  (gpu_agreement.json/.md)
#   2      eager_256          80   256 px batch 64, eager: SSDD-S (default, -nchw, -cl, -fused), SSDD-B and
#                                  -M (-nchw, -fused), AutoencoderKL, TAESD, DC-AE; memory, FLOPs
#   3      compiled_256       55   256 px batch 64, torch.compile: SSDD-S/B/M (default path) vs KL
#   4      eager_1024         40   1024 px batch 4, eager: SSDD-S (default, -nchw, -cl, -fused) vs KL
#   5      compiled_1024      35   1024 px batch 4, torch.compile: SSDD-S vs KL
#   6      cudagraphs_b4      35   256 px batch 4, torch.compile mode="reduce-overhead": SSDD-S vs KL
#   7      profile            30   CUDA kernel profile of the fastest SSDD-S path of steps 2-3
#   8      train              45   training loop, bf16 autocast, 256 px batch 32, 2 + 5 steps: SSDD-S vs
#                                  the AutoencoderKL decoder on one frozen encoder; images/s, peak memory
#   9      summary             5   steps.json / steps.md: status, seconds and recorded errors of each step
#   total                    445   (at most 472 with the kill grace), under the 480 s target
# Phase 1 runs in parallel: its wall time is that of the precompile processes (env + agreement fit inside).
#
# Everything lands in one folder, $OUT (default benchmarks/results/gpu-<date>-<time>): the tables
# (decode_*.json/.md, train.json/.md, gpu_agreement.json/.md), gpu_env.json, the profile, steps.json /
# steps.md, and logs/ (one log per step, the precompile timings). A time stamp is printed per step and the
# elapsed total at the end.
#   bash benchmarks/gpu_bf16.sh        # needs: CUDA torch, diffusers, triton, accelerate, scikit-image
# DRY_RUN=1 runs every step on the CPU at 64 px, batch 1, preset XS, to check the script before spending
# GPU time; it writes the same file names. There Triton runs through its interpreter (TRITON_INTERPRET=1;
# one interpreted decode takes 20-40 s, so the Triton path is timed once, in decode_eager_256, and left out
# of the agreement checks, which tests/core/test_fused_norms.py covers), torch.compile uses Dynamo's eager
# backend (graphs are traced, no Inductor code is generated: that takes minutes on a small CPU), training
# runs in fp32, and every budget is 4x.
# Overrides: PYTHON, OUT; EXTRA_CONTENDERS (names added to every decode step, e.g. a new variant);
# AGREE_PATHS (default "nchw cl fused default"); TRAIN_DECODERS (default "S kl").
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results/gpu-$(date +%Y-%m-%d-%H%M)}
mkdir -p "$OUT/logs" || exit 1
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
PYTHON=${PYTHON:-python3}
export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
DRY_RUN=${DRY_RUN:-0}
export DRY_RUN

# ---------------------------------------------------------------------------------------------- settings
if [ "$DRY_RUN" = 1 ]; then
  export DEVICE=cpu DTYPE=bf16 PRESET=XS MATMUL=512 AGREE_SIZES="32 64" TRITON_INTERPRET=1
  export COMPILE_BACKEND=eager AGREE_SKIP=fused
  BUDGET_SCALE=4
  SMALL=64 SMALL_BATCH=1 LARGE=64 LARGE_BATCH=1 GRAPH_BATCH=1
  EAGER_SMALL=(ssdd-XS-1-nchw ssdd-XS-1-cl ssdd-XS-1-fused ssdd-XS-1 kl tiny dc)
  COMPILED_SMALL=(ssdd-XS-1 kl)
  EAGER_LARGE=(ssdd-XS-1-nchw ssdd-XS-1-cl kl ssdd-XS-1)  # one interpreted Triton decode takes 20+ s
  COMPILED_LARGE=(ssdd-XS-1 kl)
  GRAPHS=(ssdd-XS-1 kl)
  EAGER_TIMING=(--repeats 1 --warmup 0 --no-memory)  # CPU memory: one child process per contender
  COMPILED_TIMING=(--repeats 1 --warmup 0 --no-memory)
  GRAPH_TIMING=(--repeats 1 --warmup 0 --no-memory)
  FLOPS_SMALL=()  # counting FLOPs decodes once more: decode_eager_1024 counts them, without Triton
  TRAIN=(--decoders ${TRAIN_DECODERS:-XS kl} --resolutions 64 --batch-sizes 1 --warmup 1 --repeats 1
         --mixed-precision no --device cpu --dataloader-workers 0)
  PRECOMPILE_ENV=(OMP_NUM_THREADS=1)
  # torch.compile with COMPILE_BACKEND, then benchmarks/decode_benchmark.py
  DECODE=("$PYTHON" -c 'import functools, os, runpy, sys, torch
torch.compile = functools.partial(torch.compile, backend=os.environ["COMPILE_BACKEND"])
sys.argv[0] = "benchmarks/decode_benchmark.py"
runpy.run_path(sys.argv[0], run_name="__main__")')
else
  export DEVICE=cuda DTYPE=bf16 PRESET=S MATMUL=8192 AGREE_SIZES="256 1024"
  export COMPILE_BACKEND=inductor AGREE_SKIP=
  BUDGET_SCALE=1
  SMALL=256 SMALL_BATCH=64 LARGE=1024 LARGE_BATCH=4 GRAPH_BATCH=4
  # the PyTorch paths first: a CUDA error that spoils the process (none seen so far) leaves their rows
  EAGER_SMALL=(ssdd-S-1-nchw ssdd-S-1-cl ssdd-S-1-fused ssdd-S-1 ssdd-B-1-nchw ssdd-B-1-fused
               ssdd-M-1-nchw ssdd-M-1-fused kl tiny dc)
  COMPILED_SMALL=(ssdd-S-1 ssdd-B-1 ssdd-M-1 kl)
  EAGER_LARGE=(ssdd-S-1-nchw ssdd-S-1-cl kl ssdd-S-1-fused ssdd-S-1)
  COMPILED_LARGE=(ssdd-S-1 kl)
  GRAPHS=(ssdd-S-1 kl)
  EAGER_TIMING=(--repeats 5 --warmup 2)
  COMPILED_TIMING=(--repeats 5 --warmup 2)
  GRAPH_TIMING=(--repeats 10 --warmup 3)  # reduce-overhead records its CUDA graph on a later call
  FLOPS_SMALL=(--flops)
  TRAIN=(--decoders ${TRAIN_DECODERS:-S kl} --resolutions 256 --batch-sizes 32 --warmup 2 --repeats 5
         --mixed-precision bf16 --dataloader-workers 8)
  PRECOMPILE_ENV=(OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=4)  # 8 processes on 16 cores
  DECODE=("$PYTHON" benchmarks/decode_benchmark.py)
fi
export AGREE_PATHS=${AGREE_PATHS:-nchw cl fused default}  # the Triton paths (fused, CUDA default) last
read -r -a EXTRA <<< "${EXTRA_CONTENDERS:-}"

# ---------------------------------------------------------------------------------- steps and their record
T0=$(date +%s.%N)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
stamp() { echo "[$(date +%H:%M:%S) +$(since "$T0")s] $*"; }
STEPS_TSV="$OUT/logs/steps.tsv"
: > "$STEPS_TSV"

write_steps_json() {  # steps.json from steps.tsv; the summary step rewrites it with the recorded errors
  local tmp="$OUT/logs/.steps.$BASHPID.json" sep="" name budget rc seconds outputs status
  {
    printf '{"started": "%s", "dry_run": %s, "final": false, "steps": [\n' "$STARTED" \
      "$([ "$DRY_RUN" = 1 ] && echo true || echo false)"
    while IFS=$'\t' read -r name budget rc seconds outputs; do
      case $rc in 0) status=ok ;; 124 | 137) status="timed out" ;; *) status=failed ;; esac
      printf '%s {"name": "%s", "budget_s": %s, "rc": %s, "seconds": %s, "status": "%s", "outputs": "%s"}' \
        "$sep" "$name" "$budget" "$rc" "$seconds" "$status" "$outputs"
      sep=$',\n'
    done < "$STEPS_TSV"
    printf '\n]}\n'
  } > "$tmp" && mv -f "$tmp" "$OUT/steps.json"
}

# step NAME BUDGET_S OUTPUTS COMMAND...: run COMMAND (stdin passes through, for heredocs) under
# `timeout BUDGET_S`, output in logs/NAME.log; record its exit status and seconds in steps.tsv/steps.json.
step() {
  local name=$1 budget=$(($2 * BUDGET_SCALE)) outputs=$3 start rc seconds
  shift 3
  start=$(date +%s.%N)
  stamp "$name: start (budget ${budget}s)"
  timeout -k 3 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  seconds=$(since "$start")
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$rc" "$seconds" "$outputs" >> "$STEPS_TSV"
  write_steps_json
  stamp "$name: exit status $rc after ${seconds}s"
  [ "$rc" = 0 ] || tail -n 5 "$OUT/logs/$name.log" | sed "s/^/    $name | /"
  return 0
}

decode_step() {  # decode_step NAME BUDGET_S RES BATCH ARGS...: the decode benchmark, tables NAME.json/.md
  local name=$1 budget=$2 res=$3 batch=$4
  shift 4
  step "$name" "$budget" "$name.json $name.md" "${DECODE[@]}" --device "$DEVICE" --dtype "$DTYPE" \
    --resolutions "$res" --batch-sizes "$batch" "$@" --json "$OUT/$name.json" --markdown "$OUT/$name.md"
}

# ------------------------------------------------------- phase 1: precompile ‖ environment + agreement
stamp "results in $OUT (dry run: $DRY_RUN)"
declare -A QUEUED=()
precompile() {  # precompile MODE RES BATCH CONTENDER...: one background process per case not yet queued
  local mode=$1 res=$2 batch=$3 name key
  shift 3
  for name in "$@"; do
    key="$mode-$res-$batch-$name"
    [ -z "${QUEUED[$key]:-}" ] || continue
    QUEUED[$key]=1
    step "precompile-$key" 120 "logs/precompile-$key.json" env "${PRECOMPILE_ENV[@]}" "${DECODE[@]}" \
      --device "$DEVICE" --dtype "$DTYPE" --resolutions "$res" --batch-sizes "$batch" --repeats 1 \
      --warmup 0 --no-memory --compile --compile-mode "$mode" --contenders "$name" \
      --json "$OUT/logs/precompile-$key.json" &
  done
}
precompile default "$SMALL" "$SMALL_BATCH" "${COMPILED_SMALL[@]}"
precompile default "$LARGE" "$LARGE_BATCH" "${COMPILED_LARGE[@]}"
precompile reduce-overhead "$SMALL" "$GRAPH_BATCH" "${GRAPHS[@]}"

step env 25 "gpu_env.json" "$PYTHON" - <<'PY'
import json, os, platform, subprocess, sys, time

out, device, size = os.environ["OUT"], os.environ["DEVICE"], int(os.environ["MATMUL"])
env = {"dry_run": os.environ["DRY_RUN"] == "1", "python": sys.version.split()[0], "machine": platform.node()}


def record(key, fn):
    try:
        env[key] = fn()
    except Exception as error:  # recorded, the other entries still come
        env[key] = {"error": f"{type(error).__name__}: {error}"[:500]}


def nvidia_smi():
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()


def git_commit():  # None where the copy of the tree has no .git
    cmd = ["git", "rev-parse", "HEAD"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None


def versions():
    import torch

    found = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    for module in ("triton", "diffusers", "accelerate"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            found[module] = None
    return found


def matmul_tflops():
    import torch

    def synchronize(device):
        if device == "cuda":
            torch.cuda.synchronize()

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return {"size": size, "tflops_best_of_3x10": round(2 * size**3 / best / 1e12, 2)}


record("nvidia_smi", nvidia_smi if device == "cuda" else lambda: "cpu (dry run)")
record("git_commit", git_commit)
record("versions", versions)
record("gpu", lambda: __import__("torch").cuda.get_device_name() if device == "cuda" else "cpu (dry run)")
record("bf16_matmul", matmul_tflops)
with open(f"{out}/gpu_env.json", "w") as f:
    json.dump(env, f, indent=1)
print(json.dumps(env, indent=1))
PY

step agreement 90 "gpu_agreement.json gpu_agreement.md" "$PYTHON" - <<'PY'
# Numerics of the decoder (random weights, preset S; XS in the dry run), checked one by one (a failing
# check is recorded as {"error": ...}): device fp32 vs CPU fp32; bf16 and fp16 vs device fp32 for each path;
# no NaN/inf when decoding latents 30x larger than unit variance; at every size of AGREE_SIZES.
import copy, json, os, time, torch
from ssdd_diffusers import SSDDAutoencoder

out, device = os.environ["OUT"], torch.device(os.environ["DEVICE"])
sizes = [int(s) for s in os.environ["AGREE_SIZES"].split()]
paths = os.environ["AGREE_PATHS"].split()
skip = os.environ.get("AGREE_SKIP", "").split()  # the dry run: the Triton interpreter is too slow
SETTINGS = {"default": {}, "nchw": {"channels_last": False, "fused_norm_kernels": False},
            "cl": {"channels_last": True, "fused_norm_kernels": False}, "fused": {"fused_norm_kernels": True}}
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
report = {"meta": {"preset": os.environ["PRESET"], "device": str(device), "sizes": sizes, "paths": paths,
                   "settings": {p: SETTINGS.get(p) for p in paths}, "tf32": False,
                   "large_latents": "N(0, 1) * 30, vae.decode with 1 step"}, "checks": {}}


def save():
    with open(f"{out}/gpu_agreement.json", "w") as f:
        json.dump(report, f, indent=1)


def check(key, fn):
    start = time.perf_counter()
    try:
        report["checks"][key] = fn()
    except Exception as error:  # recorded, the other checks still run
        report["checks"][key] = {"error": f"{type(error).__name__}: {error}"[:500]}
    print(f"{key}: {report['checks'][key]} ({time.perf_counter() - start:.1f}s)", flush=True)
    save()


def with_path(vae, path):
    model = copy.deepcopy(vae)
    if path not in SETTINGS:
        raise ValueError(f"unknown path {path!r}; known: {sorted(SETTINGS)}")
    for name, value in SETTINGS[path].items():
        setattr(model.decoder, name, value)
    return model


def compare(out_, ref):
    out_ = out_.float().cpu()
    rel = (out_ - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    return {"rel_rms": rel.item(), "max_abs": (out_ - ref).abs().max().item(),
            "finite": bool(torch.isfinite(out_).all())}


torch.manual_seed(0)
base = SSDDAutoencoder.from_preset("f8c4", decoder=os.environ["PRESET"]).eval()
with torch.no_grad():
    for i, size in enumerate(sizes):
        batch = 2 if i == 0 else 1
        gen = torch.Generator().manual_seed(size)
        z = torch.randn(batch, 4, size // 8, size // 8, generator=gen)
        noise = torch.randn(batch, 3, size, size, generator=gen)
        big = torch.randn(1, 4, size // 8, size // 8, generator=gen) * 30
        ones = torch.ones(batch)
        refs = {}

        def reference():
            fp32 = with_path(base, "nchw").to(device)
            refs["fp32"] = fp32.decoder(noise.to(device), ones.to(device), z.to(device)).float().cpu()
            result = {"finite": bool(torch.isfinite(refs["fp32"]).all())}
            if i == 0:  # the CPU decodes once, at the small size
                cpu = with_path(base, "nchw").decoder(noise, ones, z)
                result["device_vs_cpu_max_abs"] = (refs["fp32"] - cpu).abs().max().item()
            return result

        check(f"{size}px/fp32/reference", reference)
        if "fp32" not in refs:
            continue
        for path in paths:  # dtypes inside paths: the Triton paths run last
            for dtype in (torch.bfloat16, torch.float16):
                key = f"{size}px/{str(dtype).removeprefix('torch.')}/{path}"
                if path in skip:
                    report["checks"][key] = {"skipped": "AGREE_SKIP (the dry run: Triton's interpreter)"}
                    continue

                def run_check(dtype=dtype, path=path):
                    half = with_path(base, path).to(device=device, dtype=dtype)
                    inputs = [t.to(device=device, dtype=dtype) for t in (noise, ones, z)]
                    return compare(half.decoder(*inputs), refs["fp32"])

                def large_latents(dtype=dtype, path=path):
                    half = with_path(base, path).to(device=device, dtype=dtype)
                    image = half.decode(big.to(device=device, dtype=dtype), num_inference_steps=1).sample
                    return {"finite": bool(torch.isfinite(image).all()), "max_abs": image.abs().max().item()}

                check(key, run_check)
                check(f"{key}/large_latents", large_latents)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
lines = ["| check | rel RMS vs fp32 | max abs | finite |", "|---|---|---|---|"]
for key, value in report["checks"].items():
    if "error" in value or "skipped" in value:
        lines.append(f"| {key} | {value.get('error', value.get('skipped'))} | - | - |")
        continue
    rel = f"{value['rel_rms']:.2e}" if "rel_rms" in value else "-"
    max_abs = value.get("max_abs", value.get("device_vs_cpu_max_abs"))
    max_abs = "-" if max_abs is None else f"{max_abs:.3g}"
    lines.append(f"| {key} | {rel} | {max_abs} | {value.get('finite', '-')} |")
head = (f"Decoder {os.environ['PRESET']}, random weights, {device}, TF32 off. Reference: fp32 NCHW on the "
        "device (its max abs difference to the CPU in the reference row); large_latents: N(0, 1) * 30.")
with open(f"{out}/gpu_agreement.md", "w") as f:
    f.write(head + "\n\n" + "\n".join(lines) + "\n")
print("\n".join(lines))
PY
stamp "waiting for the precompile processes"
wait

# -------------------------------------------------------------------------- phases 2-6: decode timing
decode_step decode_eager_256 80 "$SMALL" "$SMALL_BATCH" "${EAGER_TIMING[@]}" "${FLOPS_SMALL[@]}" \
  --contenders "${EAGER_SMALL[@]}" "${EXTRA[@]}"
decode_step decode_compiled_256 55 "$SMALL" "$SMALL_BATCH" "${COMPILED_TIMING[@]}" --compile \
  --contenders "${COMPILED_SMALL[@]}" "${EXTRA[@]}"
decode_step decode_eager_1024 40 "$LARGE" "$LARGE_BATCH" "${EAGER_TIMING[@]}" --flops \
  --contenders "${EAGER_LARGE[@]}" "${EXTRA[@]}"
decode_step decode_compiled_1024 35 "$LARGE" "$LARGE_BATCH" "${COMPILED_TIMING[@]}" --compile \
  --contenders "${COMPILED_LARGE[@]}" "${EXTRA[@]}"
decode_step decode_cudagraphs_b4 35 "$SMALL" "$GRAPH_BATCH" "${GRAPH_TIMING[@]}" --compile \
  --compile-mode reduce-overhead --contenders "${GRAPHS[@]}" "${EXTRA[@]}"

# ------------------------------------------------------------------------------------- phase 7: profile
step profile 30 "profile_ssdd_fastest.json profile_ssdd_fastest.txt" "$PYTHON" - <<'PY'
# Kernel profile of the fastest SSDD path of the preset (S; XS in the dry run) timed in decode_eager_256 /
# decode_compiled_256: 3 warm decodes, then 3 profiled ones.
import functools, json, os, time, torch
from torch.profiler import ProfilerActivity, profile
from ssdd_diffusers.cli.contenders import build_contender
from ssdd_diffusers.torch_utils import DTYPES, synchronize

out, device = os.environ["OUT"], torch.device(os.environ["DEVICE"])
if os.environ["COMPILE_BACKEND"] != "inductor":
    torch.compile = functools.partial(torch.compile, backend=os.environ["COMPILE_BACKEND"])
report = {}
try:
    rows = []
    for mode in ("eager", "compiled"):
        path = f"{out}/decode_{mode}_256.json"
        if os.path.exists(path):
            with open(path) as f:
                rows += [(r["decode_s_median"], r["contender"], mode, r["resolution"], r["batch"])
                         for r in json.load(f)["results"]
                         if r["contender"].startswith(f"ssdd-{os.environ['PRESET']}-1") and "error" not in r]
    if not rows:
        raise RuntimeError("no timed SSDD row of the preset in decode_eager_256 / decode_compiled_256")
    seconds, name, mode, size, batch = min(rows)
    dtype = DTYPES[os.environ["DTYPE"]]
    c = build_contender(name, device, dtype, False, "default" if mode == "compiled" else None)
    z = c.latents(batch, size, device, dtype)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        for _ in range(3):
            c.decode(z)
        synchronize(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(3):
                c.decode(z)
            synchronize(device)
        wall = (time.perf_counter() - start) / 3
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=attr, row_limit=40, max_name_column_width=90)
    kernel_us = sum(getattr(e, attr, 0) or 0 for e in events) / 3
    report = {"contender": name, "mode": mode, "resolution": size, "batch": batch, "dtype": os.environ["DTYPE"],
              "timed_decode_s": seconds, "profiled_wall_ms_per_decode": round(wall * 1000, 2),
              ("cuda_kernel_ms_per_decode" if cuda else "cpu_self_ms_per_decode"): round(kernel_us / 1000, 2)}
    with open(f"{out}/profile_ssdd_fastest.txt", "w") as f:
        head = f"fastest SSDD path: {name} ({mode}), {size} px batch {batch}, {os.environ['DTYPE']}; 3 decodes"
        f.write(head + "\n")
        f.write(json.dumps(report) + "\n\n" + table + "\n")
except Exception as error:  # recorded in the JSON
    report["error"] = f"{type(error).__name__}: {error}"[:500]
    with open(f"{out}/profile_ssdd_fastest.txt", "w") as f:
        f.write(f"profile failed: {report['error']}\n")
with open(f"{out}/profile_ssdd_fastest.json", "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps(report, indent=1))
PY

# ------------------------------------------------------------------------------------ phase 8: training
step train 45 "train.json train.md" "$PYTHON" benchmarks/train_benchmark.py "${TRAIN[@]}" --encoder sd-vae \
  --json "$OUT/train.json" --markdown "$OUT/train.md"

# ------------------------------------------------------------------------------------- phase 9: summary
# steps.json and steps.md: each step's status, seconds, missing outputs and the errors its outputs record
# (run outside `step`, which would overwrite steps.json with the plain record of steps.tsv).
stamp "summary: start (budget $((5 * BUDGET_SCALE))s)"
timeout -k 3 $((5 * BUDGET_SCALE)) "$PYTHON" - "$T0" > "$OUT/logs/summary.log" 2>&1 <<'PY'
import json, os, sys, time

out = os.environ["OUT"]
elapsed = time.time() - float(sys.argv[1])


def recorded_errors(value, where=""):
    """'where: message' of every "error" / "*_error" entry of a results JSON."""
    if isinstance(value, list):
        for item in value:
            yield from recorded_errors(item, where)
        return
    if not isinstance(value, dict):
        return
    if "contender" in value or "decoder" in value:  # a row of a decode or training table
        name = value.get("contender") or value.get("decoder")
        where = f"{name} {value.get('resolution')}px b{value.get('batch')}"
    for key, item in value.items():
        if key == "error" or key.endswith("_error"):
            yield f"{where or key}: {item}"
        elif isinstance(item, (dict, list)):
            inner = where if key in ("results", "checks", "meta") else f"{where}/{key}".lstrip("/")
            yield from recorded_errors(item, inner)


steps = []
with open(f"{out}/logs/steps.tsv") as f:
    for line in f:
        name, budget, rc, seconds, outputs = line.rstrip("\n").split("\t")
        entry = {"name": name, "budget_s": int(budget), "rc": int(rc), "seconds": float(seconds),
                 "outputs": outputs.split(), "missing": [], "errors": []}
        for output in entry["outputs"]:
            path = f"{out}/{output}"
            if not os.path.exists(path):
                entry["missing"].append(output)
            elif output.endswith(".json"):
                try:
                    with open(path) as g:
                        entry["errors"] += list(recorded_errors(json.load(g)))
                except ValueError as error:
                    entry["errors"].append(f"{output}: unreadable JSON ({error})")
        entry["ok"] = entry["rc"] == 0 and not entry["missing"]
        entry["status"] = ("ok" if entry["ok"] else "timed out" if entry["rc"] in (124, 137)
                           else f"exit status {entry['rc']}" if entry["rc"] else "missing outputs")
        steps.append(entry)
summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(sys.argv[1]))),
           "dry_run": os.environ["DRY_RUN"] == "1", "final": True, "elapsed_s": round(elapsed, 1),
           "all_ok": all(s["ok"] for s in steps), "errors_recorded": sum(len(s["errors"]) for s in steps),
           "steps": steps}
with open(f"{out}/steps.json", "w") as f:
    json.dump(summary, f, indent=1)
lines = [f"Elapsed before the summary: {elapsed:.0f} s. All steps ok: {summary['all_ok']}; "
         f"errors recorded inside steps: {summary['errors_recorded']}.", "",
         "| step | status | seconds | budget s | recorded errors |", "|---|---|---|---|---|"]
for s in steps:
    errors = "; ".join(s["errors"]).replace("|", "/").replace("\n", " ") or "-"
    lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']} | {errors} |")
with open(f"{out}/steps.md", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
rc=$?
[ "$rc" = 0 ] || { echo "summary: exit status $rc"; tail -n 5 "$OUT/logs/summary.log"; }
cat "$OUT/steps.md" 2>/dev/null
stamp "done: elapsed total $(since "$T0") s; results in $OUT"
