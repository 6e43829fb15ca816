"""PNG plots for the analyses (matplotlib's Agg canvas; no pyplot, no global backend change).

Each function takes plain data (analysis.ModuleStats-like objects or dicts), writes one PNG and
returns `[path]`, so callers can collect what was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from statistics import median

__all__ = ["plot_spectra", "plot_truncation", "plot_amplification", "plot_similarity", "plot_memory_breakdown"]

DPI = 100
KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> list[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return [path]


def _by_kind(modules: Sequence) -> dict[str, list]:
    kinds: dict[str, list] = {}
    for m in modules:
        kinds.setdefault(m.kind, []).append(m)
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return dict(sorted(kinds.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def _integer_ticks(ax, x: bool = True, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return -(-n // cols), cols


def plot_spectra(modules: Sequence, path: str | Path) -> list[Path]:
    """Heat map per module kind: layers × singular-value index, each row normalised by its largest."""
    kinds = _by_kind(modules)
    rows, cols = _grid(len(kinds))
    fig = _figure(3.2 * cols, 2.6 * rows + 0.4)
    image = None
    for n, (kind, mods) in enumerate(kinds.items()):
        ax = fig.add_subplot(rows, cols, n + 1)
        data = [[s / m.singular_values[0] if m.singular_values[0] > 0 else 0.0 for s in m.singular_values]
                for m in mods]
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                          extent=(0.5, len(data[0]) + 0.5, len(data) - 0.5, -0.5))
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("singular value index", fontsize=8)
        ax.set_ylabel("layer" if mods[0].layer is not None else "module", fontsize=8)
        ax.tick_params(labelsize=7)
        _integer_ticks(ax, y=True)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="σ_i / σ_1")
    fig.suptitle(f"Spectrum of ΔW = s·B·A (r={modules[0].r})", fontsize=10)
    return _save(fig, path)


def plot_truncation(modules: Sequence, path: str | Path) -> list[Path]:
    """Relative Frobenius error of the best rank-k approximation of ΔW vs k, mean per kind (band: min–max)."""
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for kind, mods in _by_kind(modules).items():
        curves = [m.truncation_error for m in mods]
        ks = list(range(len(curves[0])))
        mean = [sum(c[k] for c in curves) / len(curves) for k in ks]
        line, = ax.plot(ks, mean, marker=".", label=kind, linewidth=1.2)
        ax.fill_between(ks, [min(c[k] for c in curves) for k in ks], [max(c[k] for c in curves) for k in ks],
                        color=line.get_color(), alpha=0.12)
    r = len(modules[0].truncation_error) - 1
    ks = list(range(r + 1))
    ax.plot(ks, [((r - k) / r) ** 0.5 for k in ks], "k:", linewidth=1, label="flat spectrum")
    _integer_ticks(ax)
    ax.set_xlabel("rank k of the approximation")
    ax.set_ylabel("‖ΔW − ΔW_k‖_F / ‖ΔW‖_F")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Error vs rank (r={r})", fontsize=10)
    return _save(fig, path)


def plot_amplification(modules: Sequence, path: str | Path) -> list[Path]:
    """Per layer: amplification ‖ΔW‖/‖UᵀWV‖ (ΔW's directions, dashed: random), and NF4 error / ‖ΔW‖."""
    fig = _figure(10, 3.6)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    random: dict[int, list[float]] = {}
    for kind, mods in _by_kind(modules).items():
        xs = [m.layer if m.layer is not None else i for i, m in enumerate(mods)]
        left.plot(xs, [m.base["factor"] for m in mods], marker=".", label=kind, linewidth=1)
        for x, m in zip(xs, mods):
            random.setdefault(x, []).append(m.base["factor_random"])
        ratio = [m.base.get("nf4_error_over_delta") for m in mods]
        if all(v is not None for v in ratio):
            right.plot(xs, ratio, marker=".", label=kind, linewidth=1)
    xs = sorted(random)
    left.plot(xs, [median(random[x]) for x in xs], "k--", linewidth=1.5, label="random U, V (median)")
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("‖ΔW‖_F / ‖UᵀWV‖_F")
    left.set_title("Amplification along ΔW's top-r directions", fontsize=9)
    right.set_xlabel("layer")
    right.set_ylabel("‖W0 − deq(q(W0))‖_F / ‖ΔW‖_F")
    right.set_title("NF4 round-trip error of W0 relative to the update", fontsize=9)
    for ax in (left, right):
        _integer_ticks(ax)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_similarity(comparison: dict, path: str | Path) -> list[Path]:
    """φ(i, j) heat maps per module kind, a middle layer and the mean over layers: A's right singular
    subspaces (the paper's measure) and ΔW's left singular subspaces (out-space, where B lives)."""
    kinds = comparison["kinds"]
    panels = [("grid_A_middle", "A, layer {layer}"), ("grid_A_mean", "A, mean of {n} layers"),
              ("grid_delta_out_middle", "ΔW out-space, layer {layer}"), ("grid_delta_out_mean", "ΔW out-space, mean")]
    fig = _figure(3.0 * len(panels), 2.7 * len(kinds) + 0.5)
    image = None
    for row, (kind, data) in enumerate(kinds.items()):
        for col, (key, title) in enumerate(panels):
            ax = fig.add_subplot(len(kinds), len(panels), row * len(panels) + col + 1)
            grid = data[key]
            image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest",
                              extent=(0.5, len(grid[0]) + 0.5, len(grid) + 0.5, 0.5))
            ax.set_title(f"{kind}: " + title.format(layer=data["middle_layer"], n=data["modules"]), fontsize=8)
            ax.set_xlabel(f"j (r={comparison['r2']})", fontsize=8)
            ax.set_ylabel(f"i (r={comparison['r1']})", fontsize=8)
            ax.tick_params(labelsize=7)
            _integer_ticks(ax, y=True)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="φ(i, j)")
    fig.suptitle(f"Subspace similarity φ(i, j): r={comparison['r1']} vs r={comparison['r2']}", fontsize=10)
    return _save(fig, path)


def plot_memory_breakdown(segments: dict[str, float], path: str | Path, *, title: str = "peak memory",
                          xlabel: str = "", capacity: float | None = None, capacity_label: str = "capacity",
                          unit: str = "GiB") -> list[Path]:
    """One stacked bar of `segments` (label -> size in `unit`, bottom-up; zeros skipped), its total written
    above it, and a dashed line at `capacity` (a GPU's memory) when given. Used by `memory.memory_report`."""
    fig = _figure(6.5, 6)
    ax = fig.add_subplot()
    parts = [(label, value) for label, value in segments.items() if value > 0]
    total, bottom = sum(v for _, v in parts), 0.0
    for index, (label, value) in enumerate(parts):
        ax.bar(0, value, bottom=bottom, width=0.5, color=f"C{index}", label=f"{label}: {value:.2f} {unit}")
        if value > 0.04 * total:
            ax.text(0, bottom + value / 2, f"{value:.2f}", ha="center", va="center", color="white", fontsize=9)
        bottom += value
    ax.text(0, bottom, f"total {total:.2f} {unit}", ha="center", va="bottom", fontweight="bold")
    top = bottom * 1.12 or 1.0
    if capacity:
        ax.axhline(capacity, color="black", linestyle="--", label=f"{capacity_label}: {capacity:.0f} {unit}")
        top = max(top, capacity * 1.08)
    ax.set_ylim(0, top)
    ax.set_xlim(-0.8, 0.8)
    ax.set_xticks([0], [xlabel])
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, path)
