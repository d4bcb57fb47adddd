"""How well each replacement keeps the teacher's token-to-token relations, per attention site.

Two measures, both teacher-forced (each site's original attention and its replacement read the
SAME input: the teacher's input to that block, on held-out data):

- **linear CKA** between the teacher's context (attention output before the output projection) and
  the replacement's output over all held-out tokens (1 = the same representation up to rotation
  and scale; Kornblith et al. 2019);
- **influence-map correlation**: for each (target token i, source token j) the size of the change
  of output token i when input token j alone is nudged (a finite-difference Jacobian norm, same
  random nudges for both), giving an N x N token-to-token map for attention and for its
  replacement; the Pearson correlation of the two maps over the off-diagonal entries (i != j),
  averaged over images. This extends FAR's qualitative "attention map vs LSTM gradient map"
  comparison to a number per site.

Every student is measured next to the same replacement freshly initialised (``untrained``), the
baseline that says how much of each number distillation earned.

Writes JSON and a figure: the per-site heat map of both measures for every student, and the two
influence maps of one held-out digit for a few sites.

Run (after ``surgery recipe mnist --out runs/mnist ...``):
    python benchmarks/token_relations.py --teacher runs/mnist/teacher \
        --students runs/mnist/mhlstm/stage2 --json benchmarks/results/token_relations.json \
        --png docs/img/token_relations.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from surgery.swap import replaced_sites  # noqa: E402


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations [M, C1], [M, C2] of the same M items.

    Example:
        >>> a = torch.randn(100, 8)
        >>> round(linear_cka(a, a @ torch.linalg.qr(torch.randn(8, 8))[0] * 3), 4)
        1.0
    """
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


def teacher_site_io(teacher: nn.Module, images: torch.Tensor, sites) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every site: the teacher's block input [B,N,D] and its context [B,N,C] on ``images``."""
    records: dict[str, dict] = {s.name: {} for s in sites}
    handles = []
    for site in sites:
        block = teacher.get_submodule(site.name)
        handles.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, name=site.name: records[name].__setitem__("hidden", args[0]), with_kwargs=True))
        if site.out_proj:
            handles.append(block.get_submodule(site.out_proj).register_forward_pre_hook(
                lambda m, args, name=site.name: records[name].__setitem__("context", args[0])))
        else:
            handles.append(block.register_forward_hook(
                lambda m, args, out, name=site.name: records[name].__setitem__(
                    "context", out if isinstance(out, torch.Tensor) else out[0])))
    try:
        with torch.no_grad():
            teacher(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (r["hidden"], r["context"]) for name, r in records.items()}


def teacher_context_fn(teacher: nn.Module, site):
    """hidden [B,N,D] -> the teacher attention's context at ``site``."""
    block = teacher.get_submodule(site.name)

    def run(hidden: torch.Tensor) -> torch.Tensor:
        captured = {}
        if site.out_proj:
            handle = block.get_submodule(site.out_proj).register_forward_pre_hook(
                lambda m, args: captured.__setitem__("context", args[0]))
            try:
                block(hidden)
            finally:
                handle.remove()
            return captured["context"]
        out = block(hidden)
        return out if isinstance(out, torch.Tensor) else out[0]

    return run


def influence_map(function, hidden: torch.Tensor, nudges: int = 4, scale: float = 0.05,
                  seed: int = 0) -> torch.Tensor:
    """Finite-difference token influence: map[i, j] = mean over random nudges of
    ||f(h + d e_j)_i - f(h)_i|| / ||d|| for one sample ``hidden`` [1, N, D] -> [N, N]."""
    _, tokens, dim = hidden.shape
    generator = torch.Generator().manual_seed(seed)
    base = function(hidden)[0]
    size = scale * hidden.norm(dim=-1).mean()
    total = torch.zeros(tokens, tokens, dtype=torch.float64)
    for _ in range(nudges):
        direction = torch.randn(tokens, dim, generator=generator)
        direction = direction / direction.norm(dim=-1, keepdim=True) * size
        batch = hidden.repeat(tokens, 1, 1)
        batch[torch.arange(tokens), torch.arange(tokens)] += direction
        out = function(batch)                                     # [source j, target i, C]
        total += ((out - base.unsqueeze(0)).norm(dim=-1) / size).T.double()
    return (total / nudges).float()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two N x N maps over the OFF-diagonal entries: every token's influence
    on itself (the residual-like diagonal) is large for any mixer and would hide the relations."""
    keep = ~torch.eye(a.shape[0], dtype=torch.bool)
    a, b = a[keep].double(), b[keep].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-12))


@torch.no_grad()
def measure(teacher: nn.Module, student: nn.Module, images: torch.Tensor, map_images: int) -> dict:
    sites = [w.site for w in replaced_sites(student)]
    io = teacher_site_io(teacher, images, sites)
    wrappers = {w.site.name: w for w in replaced_sites(student)}
    result = {"sites": [], "maps": {}}
    for site in sites:
        hidden, context = io[site.name]
        mixer = wrappers[site.name].mixer
        predicted = mixer(hidden, None)
        cka = linear_cka(context.reshape(-1, context.shape[-1]), predicted.reshape(-1, predicted.shape[-1]))
        teacher_fn = teacher_context_fn(teacher, site)
        correlations = []
        for index in range(map_images):
            sample = hidden[index:index + 1]
            teacher_map = influence_map(teacher_fn, sample, seed=index)
            student_map = influence_map(lambda h: mixer(h, None), sample, seed=index)
            correlations.append(pearson(teacher_map, student_map))
            if index == 0:
                result["maps"][site.name] = {"teacher": teacher_map.tolist(), "student": student_map.tolist()}
        result["sites"].append({"site": site.name, "cka": cka,
                                "influence_correlation": sum(correlations) / len(correlations)})
    return result


def plot(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    sites = [s["site"] for s in results[names[0]]["sites"]]
    shown = sites[:: max(1, len(sites) // 3)][:3]
    figure = plt.figure(figsize=(4 + 3.2 * len(shown), 3.2 + 2.6 * len(names)))
    grid = figure.add_gridspec(1 + len(names), 1 + len(shown) * 2, width_ratios=[2.5] + [1] * 2 * len(shown))
    table = figure.add_subplot(grid[0, :])
    values = [[s["cka"] for s in results[n]["sites"]] + [s["influence_correlation"] for s in results[n]["sites"]]
              for n in names]
    image = table.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    table.set_yticks(range(len(names)), names)
    table.set_xticks(range(2 * len(sites)), [f"CKA {s}" for s in sites] + [f"infl. r {s}" for s in sites],
                     rotation=60, ha="right", fontsize=7)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            table.text(c, r, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=7)
    figure.colorbar(image, ax=table, fraction=0.02)
    table.set_title("per-site linear CKA and influence-map correlation with the teacher's attention")
    for r, name in enumerate(names):
        axis = figure.add_subplot(grid[1 + r, 0])
        axis.axis("off")
        axis.text(0, 0.5, f"{name}\ninfluence maps,\nheld-out digit 0\n(rows: target,\ncols: source token)", fontsize=8, va="center")
        for k, site in enumerate(shown):
            maps = results[name]["maps"][site]
            for m, key in enumerate(("teacher", "student")):
                axis = figure.add_subplot(grid[1 + r, 1 + 2 * k + m])
                axis.imshow(maps[key], cmap="magma")
                axis.set_title(f"{site}\n{'attention' if key == 'teacher' else 'replacement'}", fontsize=7)
                axis.set_xticks([])
                axis.set_yticks([])
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="saved teacher directory (MNIST recipe: OUT/teacher)")
    parser.add_argument("--students", nargs="+", required=True,
                        help="saved, not finalized student directories (e.g. OUT/mhlstm/stage2)")
    parser.add_argument("--images", type=int, default=200, help="held-out digits for CKA")
    parser.add_argument("--map-images", type=int, default=8, help="held-out digits for influence maps")
    parser.add_argument("--json")
    parser.add_argument("--png")
    args = parser.parse_args()
    from surgery.recipes.mnist import build_vit, load_digits

    torch.manual_seed(0)
    teacher = surgery.load(args.teacher, model=build_vit()).eval()
    images = load_digits()[2][: args.images]
    results = {}
    for directory in args.students:
        student = surgery.load(directory, model=build_vit()).eval()
        replacement = next(replaced_sites(student)).replacement
        untrained = surgery.load(args.teacher, model=build_vit()).eval()
        torch.manual_seed(0)
        surgery.replace_attention(untrained, replacement, (images[:1],))
        label = "/".join(Path(directory).parts[-2:])
        for name, model in ((f"{replacement} untrained", untrained), (label, student)):
            if name in results:
                continue
            results[name] = measure(teacher, model, images, args.map_images)
            for row in results[name]["sites"]:
                print(json.dumps({"student": name, **row}), file=sys.stderr, flush=True)
    from surgery.recipes.report import markdown_table

    rows = [{"student": name, **row} for name, result in results.items() for row in result["sites"]]
    print(markdown_table(["student", "site", "cka", "influence_correlation"], rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
