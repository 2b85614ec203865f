"""The package's layering: a model library that pipelines import, with data, evaluation, training and the
command line on top of it, no import cycle (lazy imports included), and extras that fail in one line."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from helpers.configs import TINY_MODEL_CONFIG

import ssdd_diffusers

PACKAGE = Path(ssdd_diffusers.__file__).parent
APPLICATION_PARTS = ("data", "evaluation", "training", "cli")
#: What each part may import, besides the core library (everything outside the application parts).
ALLOWED = {
    "core": set(),
    "data": {"data"},
    "evaluation": {"data", "evaluation"},
    "training": {"data", "evaluation", "training"},
    "cli": {"data", "evaluation", "cli"},
}
OPTIONAL = ["accelerate", "datasets", "lpips", "transformers", "schedulefree", "torchmetrics",
            "torch_fidelity", "skimage", "scipy", "torchvision"]  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every ssdd_diffusers module that ``path`` imports, at the top or inside functions: ``from X import
    name`` counts as an import of ``X.name`` when that is a module, else of ``X``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ssdd_diffusers")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ssdd_diffusers"):
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {target}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 and pieces[1] in APPLICATION_PARTS else "core"


def test_parts_only_import_what_sits_below_them() -> None:
    violations = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if part(target) != "core" and part(target) not in ALLOWED[part(module)]
    ]
    assert not violations, violations
    graph = import_graph()
    # the two couplings the restructuring removed stay removed
    assert not any(part(t) == "evaluation" for t in graph["ssdd_diffusers.model_card"])
    assert "ssdd_diffusers.models.autoencoder_ssdd" in graph["ssdd_diffusers.models"]


def test_no_import_cycles_lazy_imports_included() -> None:
    graph = import_graph()
    done: set[str] = set()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        for target in sorted(graph[node]):
            if target in stack:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in done:
                visit(target, stack + [target])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, cycles


def test_core_install_decodes_and_extras_fail_in_one_line(tmp_path: Path) -> None:
    """With every optional dependency missing: decode, save, reload and write a model card; training,
    evaluation metrics and data loading each fail with one line that names the pip command."""
    script = f"""
import json, sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None
import torch
from ssdd_diffusers import SSDDAutoencoder
from ssdd_diffusers.model_card import write_model_card_for_folder
vae = SSDDAutoencoder(**json.loads({json.dumps(TINY_MODEL_CONFIG)!r})).eval()
with torch.no_grad():
    image = vae.decode(torch.randn(1, 4, 8, 8), num_inference_steps=1).sample
vae.save_pretrained({str(tmp_path)!r})
card = write_model_card_for_folder({str(tmp_path)!r})
again = SSDDAutoencoder.from_pretrained({str(tmp_path)!r})
errors = {{}}
for module in ("ssdd_diffusers.training.trainer", "ssdd_diffusers.data"):
    try:
        __import__(module)
    except ImportError as error:
        errors[module] = str(error)
from ssdd_diffusers.evaluation import ssim
try:
    ssim(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
except ImportError as error:
    errors["ssim"] = str(error)
print(json.dumps({{"shape": list(image.shape), "card": card.is_file(), "errors": errors}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 3, 16, 16] and report["card"]  # f2 encoder: 8x8 latents, 16x16 images
    assert set(report["errors"]) == {"ssdd_diffusers.training.trainer", "ssdd_diffusers.data", "ssim"}
    for message in report["errors"].values():
        assert "\n" not in message and "pip install 'ssdd-diffusers[" in message, message
    assert "[training]" in report["errors"]["ssdd_diffusers.training.trainer"]
    assert "[eval]" in report["errors"]["ssim"]


def test_command_line_reports_a_missing_extra_in_one_line(tmp_path: Path) -> None:
    script = f"""
import sys
sys.modules["torchvision"] = None
from ssdd_diffusers.cli import main
main(["reconstruct", {str(tmp_path)!r}, {str(tmp_path)!r}, "--output_dir", {str(tmp_path / "out")!r}])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: ssdd_diffusers.data needs torchvision, which is not installed: "
                     "pip install 'ssdd-diffusers[eval]'"]  # fmt: skip
