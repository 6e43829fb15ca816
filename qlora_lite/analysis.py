"""The LoRA paper's analyses of a trained adapter: accounting, spectra, subspaces, amplification.

    adapter dir ──► read_adapter ──► per module A (r×in), B (out×r), s
        │  delta_svd: QR of Bᵀ-side and Aᵀ-side factors, SVD of the r×r core  (ΔW = s·B·A never formed)
        ▼
    spectrum S ──► effective_rank, energy_share, truncation_error_curve
    A, A' (two adapters) ──► similarity_grid φ(i, j)                       (LoRA paper §7.2)
    base W (safetensors) ──► amplification ‖ΔW‖/‖UᵀWV‖, NF4 round-trip error   (§7.3, QLoRA)
        │
        ▼
    analyze() ──► report.md, report.json, PNG plots;  account() ──► parameters and bytes

Everything here is a pure function of tensors or files; nothing builds the model. Shapes of the
base checkpoint come from the safetensors headers, so accounting a 70B base reads kilobytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import torch

from .adapter import AdapterFile, read_adapter
from .config import QuantConfig
from .errors import CheckpointError
from .inject import find_targets
from .load import build_skeleton, checkpoint_files
from .nf4 import NF4Weight, nf4_nbytes
from .settings import check_base, quant_for, read_settings
from .shards import ShardReader, read_quant_shape

__all__ = [
    "Accounting", "account", "gpt3_175b_accounting", "nf4_bytes",
    "delta_svd", "delta_spectrum", "effective_rank", "energy_share", "truncation_error_curve",
    "subspace_similarity", "similarity_grid", "basis_similarity_grid",
    "amplification", "quantization_error",
    "ModuleStats", "Report", "analyze", "headline", "analyze_command",
]

_ADAM_BYTES = 8  # fp32 first + second moment per trainable parameter
_KIND_RANK = {k: i for i, k in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


# --- accounting ----------------------------------------------------------------------

nf4_bytes = nf4_nbytes  # the one byte count (nf4.py), under the name this module has always exported


def _base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: logical shape} from the validated safetensors headers (shards.read_header); no tensor
    data is read. bnb-4bit weights report their unpacked shape (from the small quant-state tensor)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(base_dir):
        with ShardReader(file) as reader:
            for name, entry in reader.entries.items():
                if name.endswith(".weight.quant_state.bitsandbytes__nf4"):
                    shapes[name.split(".weight.")[0] + ".weight"] = read_quant_shape(reader, name)
                elif ".weight." not in name:  # skips bnb companions (absmax, quant_map, ...)
                    shapes.setdefault(name, entry.shape)
    return shapes


def _nf4_linears(base_dir: Path) -> set[str]:
    """The weights load_model stores in NF4 (every nn.Linear but the LM head), from the model's meta skeleton:
    the one rule inject and merge apply, not a guess from tensor names."""
    skeleton, _config, _prequant = build_skeleton(base_dir)
    return {f"{name}.weight" for name in find_targets(skeleton, "all-linear")}


@dataclass
class Accounting:
    """Parameters and bytes of an adapter, beside its base (base fields are None without a base)."""

    trainable_params: int
    adapted_base_params: int             # in·out summed over the adapted linears
    adapter_file_bytes: int              # adapter_model.safetensors on disk
    adapter_tensor_bytes: int
    lora_optimizer_bytes: int            # Adam m + v in fp32
    total_params: int | None = None      # base checkpoint (tied weights counted once)
    trainable_ratio: float | None = None  # trainable / total
    linear_params: int | None = None
    full_16bit_bytes: int | None = None  # total · 2
    checkpoint_file_bytes: int | None = None
    nf4_base_bytes: int | None = None    # linears NF4, the rest 16-bit
    full_ft_optimizer_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _as_adapter(adapter: str | Path | AdapterFile) -> AdapterFile:
    if isinstance(adapter, AdapterFile):
        return adapter
    path = Path(adapter)
    return read_adapter(path.parent if path.is_file() else path)


def account(adapter_dir_or_file: str | Path | AdapterFile, base_dir: str | Path | None = None) -> Accounting:
    """Trainable vs total parameters, bytes on disk and Adam state for LoRA vs full fine-tuning."""
    adapter = _as_adapter(adapter_dir_or_file)
    tensors = list(adapter.lora_A.values()) + list(adapter.lora_B.values())
    trainable = sum(t.numel() for t in tensors)
    weights = adapter.path / "adapter_model.safetensors"
    acc = Accounting(
        trainable_params=trainable,
        adapted_base_params=sum(adapter.experts.get(m, 1) * adapter.lora_B[m].shape[0] * adapter.lora_A[m].shape[1]
                                for m in adapter.modules),  # an expert projection: every expert's matrix
        adapter_file_bytes=weights.stat().st_size if weights.is_file() else 0,
        adapter_tensor_bytes=sum(t.numel() * t.element_size() for t in tensors),
        lora_optimizer_bytes=_ADAM_BYTES * trainable)
    if base_dir is not None:
        shapes = _base_shapes(Path(base_dir))
        total = sum(math.prod(s) for s in shapes.values())
        nf4 = _nf4_linears(Path(base_dir))
        linear = [math.prod(s) for n, s in shapes.items() if n in nf4]
        acc.total_params, acc.linear_params = total, sum(linear)
        acc.trainable_ratio = trainable / total if total else None
        acc.full_16bit_bytes = 2 * total
        acc.checkpoint_file_bytes = sum(f.stat().st_size for f in checkpoint_files(Path(base_dir)))
        acc.nf4_base_bytes = sum(nf4_bytes(n) for n in linear) + 2 * (total - sum(linear))
        acc.full_ft_optimizer_bytes = _ADAM_BYTES * total
    return acc


def gpt3_175b_accounting(r: int = 4) -> dict:
    """The LoRA paper's GPT-3 175B row, computed: r on Wq and Wv of 96 layers, d_model 12288."""
    layers, d, total = 96, 12288, 175e9
    trainable = layers * 2 * r * (d + d)
    return {"shape": "GPT-3 175B: 96 layers, d_model 12288, LoRA on Wq, Wv", "r": r,
            "trainable_params": trainable, "fewer_trainable_x": total / trainable,
            "paper_claim_fewer_trainable_x": 10_000, "paper_claim_checkpoint": "350 GB -> 35 MB",
            "full_16bit_bytes": 2 * total, "adapter_16bit_bytes": 2 * trainable,
            "full_ft_optimizer_bytes": _ADAM_BYTES * total, "lora_optimizer_bytes": _ADAM_BYTES * trainable,
            # Wq, Wk, Wv, Wo (d×d) and the two d×4d MLP matrices of each layer, in NF4
            "nf4_linear_bytes": layers * (4 * nf4_bytes(d * d) + 2 * nf4_bytes(4 * d * d))}


# --- spectrum of ΔW = s·B·A from the factors -----------------------------------------

def delta_svd(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ΔW = s·B·A without forming the out×in matrix: U (out×r), S (r), Vh (r×in).

    B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR), so ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ; the SVD of the r×r
    core C = U_c S V_cᵀ gives U = Q_B U_c and Vh = V_cᵀ Q_Aᵀ. Cost O((in+out)·r²). Computed in
    float64, returned as float32, singular values in descending order.
    """
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not chain as B·A")
    r, (out, inp) = A.shape[0], (B.shape[0], A.shape[1])
    if r > min(inp, out):
        raise ValueError(f"rank r={r} exceeds min(in={inp}, out={out}): ΔW cannot have rank r; "
                         "this adapter was not made for a layer of this shape")
    q_b, r_b = torch.linalg.qr(B.double())
    q_a, r_a = torch.linalg.qr(A.double().T)
    u_c, s, vh_c = torch.linalg.svd(float(scaling) * r_b @ r_a.T)
    return (q_b @ u_c).float(), s.float(), (vh_c @ q_a.T).float()


def delta_spectrum(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values of ΔW = s·B·A (length r, descending), from the small factors only."""
    return delta_svd(A, B, scaling)[1]


def effective_rank(S: torch.Tensor) -> float:
    """Entropy effective rank exp(H(p)) with p = S²/ΣS² (the energy distribution over directions).

    r equal singular values give r, one direction gives 1, a zero matrix gives 0. This is the
    energy-weighted variant; Roy & Vetterli (2007) use p = S/ΣS, which reads higher on skewed spectra.
    """
    energy = S.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0.0
    p = energy[energy > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_share(S: torch.Tensor, k: int) -> float:
    """Fraction of ‖ΔW‖_F² in the top-k singular directions (0 for a zero matrix)."""
    energy = S.double() ** 2
    total = energy.sum()
    return float(energy[:k].sum() / total) if total > 0 else 0.0


def truncation_error_curve(S: torch.Tensor) -> list[float]:
    """Relative Frobenius error of the best rank-k approximation, k = 0..r:
    sqrt(Σ_{i>k} S_i²) / sqrt(Σ S_i²) (Eckart–Young); all zeros for a zero matrix."""
    energy = torch.sort(S.double() ** 2, descending=True).values
    total = energy.sum()
    if total <= 0:
        return [0.0] * (len(S) + 1)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return [float(x) for x in (tail.clamp_min(0) / total).sqrt()]


# --- subspace similarity (LoRA paper §7.2) -------------------------------------------

def _right_basis(A: torch.Tensor) -> torch.Tensor:
    """Right singular vectors of A as rows (r×in), most important first."""
    return torch.linalg.svd(A.double(), full_matrices=False)[2]


def basis_similarity_grid(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) = ‖V1[:i] V2[:j]ᵀ‖_F² / min(i, j) for orthonormal row bases ordered by importance.

    Entry [i-1, j-1]; 1 when one subspace contains the other, 0 when orthogonal. Two random
    subspaces of an n-dimensional space score max(i, j)/n on average (the chance level).
    """
    if V1.shape[1] != V2.shape[1]:
        raise ValueError(f"bases live in different spaces ({V1.shape[1]} vs {V2.shape[1]} dimensions)")
    overlap = (V1.double() @ V2.double().T) ** 2
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, V1.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, V2.shape[0] + 1, dtype=torch.float64)[None, :]
    return (cumulative / torch.minimum(i, j)).clamp(0, 1).float()


def similarity_grid(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) for i = 1..r1, j = 1..r2 (an r1×r2 tensor), from the right singular vectors of A."""
    return basis_similarity_grid(_right_basis(A1), _right_basis(A2))


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """φ = ‖U_{A1,i}ᵀ U_{A2,j}‖_F² / min(i, j), U_{A,i} = top-i right singular vectors of A (in×i)."""
    if not (1 <= i <= A1.shape[0] and 1 <= j <= A2.shape[0]):
        raise ValueError(f"need 1 ≤ i ≤ {A1.shape[0]} and 1 ≤ j ≤ {A2.shape[0]}; got i={i}, j={j}")
    return float(similarity_grid(A1, A2)[i - 1, j - 1])


# --- amplification (§7.3) and NF4 error ----------------------------------------------

def amplification(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, seed: int = 0) -> dict:
    """How strongly ΔW amplifies directions W already has (LoRA paper, Table 7).

    U, V = ΔW's top-r left/right singular vectors (from `delta_svd`); `proj_delta` = ‖Uᵀ W V‖_F,
    the part of W inside ΔW's subspaces; `factor` = ‖ΔW‖_F / proj_delta. The same with random
    orthonormal U, V (QR of Gaussians, seeded) gives `proj_random` and `factor_random`, and
    `proj_w_top` = ‖top-r singular values of W‖ is W's own top-r directions, for scale;
    `vs_random` = proj_delta / proj_random. The paper (GPT-3, layer 48, Wq, r=4) found 0.32 vs
    0.02 vs 21.67 and a factor of 21.5: ΔW boosts directions W has but does not emphasise.
    """
    U, S, Vh = delta_svd(A, B, scaling)
    W = W.double()
    if W.shape != (U.shape[0], Vh.shape[1]):
        raise ValueError(f"base weight {tuple(W.shape)} does not match ΔW {(U.shape[0], Vh.shape[1])}")
    r = S.numel()
    gen = torch.Generator().manual_seed(seed)
    u_rand = torch.linalg.qr(torch.randn(W.shape[0], r, generator=gen, dtype=torch.float64))[0]
    v_rand = torch.linalg.qr(torch.randn(W.shape[1], r, generator=gen, dtype=torch.float64))[0]
    delta_norm = float(S.double().norm())
    proj_delta = float(torch.linalg.norm(U.double().T @ W @ Vh.double().T))
    proj_random = float(torch.linalg.norm(u_rand.T @ W @ v_rand))
    gram = W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T  # σ(W)² = eigenvalues of the smaller Gram matrix
    top_energy = torch.linalg.eigvalsh(gram).flip(0)[:r].clamp_min(0).sum()
    return {"delta_fro": delta_norm, "w_fro": float(W.norm()), "proj_delta": proj_delta,
            "proj_random": proj_random, "proj_w_top": float(top_energy.sqrt()),
            "vs_random": proj_delta / proj_random if proj_random > 0 else math.inf,  # paper: 0.32/0.02 = 16
            "factor": delta_norm / proj_delta if proj_delta > 0 else math.inf,
            "factor_random": delta_norm / proj_random if proj_random > 0 else math.inf}


def quantization_error(W: torch.Tensor, delta_fro: float | None = None, blocksize: int = 64,
                       double_quant: bool = True) -> dict:
    """NF4 round trip of W0: ‖W0 − deq(q(W0))‖_F, relative to ‖W0‖_F and to ‖ΔW‖_F."""
    W = W.float()
    err = float(torch.linalg.norm(W - NF4Weight.from_tensor(W, blocksize, double_quant).dequantize(torch.float32)))
    norm = float(torch.linalg.norm(W))
    return {"nf4_error_fro": err, "nf4_error_rel": err / norm if norm else 0.0,
            "nf4_error_over_delta": err / delta_fro if delta_fro else None}


# --- the report ----------------------------------------------------------------------

@dataclass
class ModuleStats:
    module: str
    kind: str
    layer: int | None
    shape: tuple[int, int]  # (out, in)
    r: int
    singular_values: list[float]
    effective_rank: float
    energy: dict[int, float]
    truncation_error: list[float]
    base: dict = field(default_factory=dict)  # amplification + NF4 error, with a base checkpoint


@dataclass
class Report:
    adapter: str
    accounting: Accounting
    modules: list[ModuleStats]
    comparison: dict | None
    out_dir: Path
    files: list[Path]
    gpt3: dict

    def to_dict(self) -> dict:
        return {"adapter": self.adapter, "accounting": self.accounting.to_dict(),
                "modules": [asdict(m) for m in self.modules], "comparison": self.comparison,
                "out_dir": str(self.out_dir), "files": [str(f) for f in self.files], "gpt3_175b": self.gpt3}


def _kind_layer(module: str) -> tuple[str, int | None]:
    numbers = re.findall(r"\.(\d+)\.", f".{module}.")
    return module.rsplit(".", 1)[-1], int(numbers[-1]) if numbers else None


def _model_order(modules) -> list[str]:
    """By layer, then q, k, v, o, gate, up, down (other kinds after, by name)."""
    def key(module: str):
        kind, layer = _kind_layer(module)
        return (-1 if layer is None else layer, _KIND_RANK.get(kind, len(_KIND_RANK)), module)
    return sorted(modules, key=key)


def _stat(values, how: str = "mean") -> float | None:
    """Mean or median of the finite values; None when there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return None if not values else median(values) if how == "median" else sum(values) / len(values)


class _BaseWeights:
    """Reads single 2-D base weights on demand from a (sharded) safetensors checkpoint, as fp32."""

    def __init__(self, base_dir: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), framework="pt") for f in checkpoint_files(base_dir)]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def get(self, module: str) -> tuple[torch.Tensor, bool]:
        """(W fp32, already_quantized)."""
        key = f"{module}.weight"
        if key not in self.where:
            raise CheckpointError(f"the base checkpoint has no {key}; is it the adapter's base model?")
        tensor = self.where[key].get_tensor(key)
        if tensor.dtype != torch.uint8:
            return tensor.float(), False
        state = {k: self.where[k].get_tensor(k) for k in self.where if k.startswith(key + ".") or k == key}
        return NF4Weight.from_state_dict(state, key, backend="torch").dequantize(torch.float32), True


def _module_stats(adapter: AdapterFile, module: str, top_k, base: _BaseWeights | None,
                  quant: QuantConfig) -> ModuleStats:
    A, B = adapter.lora_A[module], adapter.lora_B[module]
    if A.shape[0] > min(A.shape[1], B.shape[0]):
        raise CheckpointError(f"{adapter.path}: {module} has r={A.shape[0]} > min(in={A.shape[1]}, "
                              f"out={B.shape[0]}); ΔW cannot reach rank r and parameters are wasted: use a smaller r")
    S = delta_spectrum(A, B, adapter.scaling_for(module))
    kind, layer = _kind_layer(module)
    stats = ModuleStats(module, kind, layer, (B.shape[0], A.shape[1]), A.shape[0], [float(s) for s in S],
                        effective_rank(S), {k: energy_share(S, k) for k in top_k if k <= len(S)},
                        truncation_error_curve(S))
    if base is not None:
        W, prequantized = base.get(module)
        if tuple(W.shape) != stats.shape:
            raise CheckpointError(f"{module}: base weight {tuple(W.shape)} but the adapter expects {stats.shape}")
        stats.base = amplification(W, A, B, adapter.scaling_for(module))
        if not prequantized:
            stats.base.update(quantization_error(W, stats.base["delta_fro"], quant.blocksize, quant.double_quant))
    return stats


def _compare(a1: AdapterFile, a2: AdapterFile, kinds: tuple[str, ...]) -> dict:
    """φ grids on the modules both adapters share (same shapes); lists what was skipped."""
    def same(m: str) -> bool:
        return a1.lora_A[m].shape[1] == a2.lora_A[m].shape[1] and a1.lora_B[m].shape[0] == a2.lora_B[m].shape[0]
    shared = (set(a1.modules) - set(a1.experts)) & (set(a2.modules) - set(a2.experts))  # linears (see analyze)
    common = [m for m in _model_order(shared) if same(m)]
    skipped = {"only_in_adapter": sorted(set(a1.modules) - shared), "only_in_compare": sorted(set(a2.modules) - shared),
               "shape_mismatch": sorted(shared - set(common))}
    present = sorted({_kind_layer(m)[0] for m in common})
    out = {"compare_to": str(a2.path), "r1": a1.r, "r2": a2.r, "common": len(common), "skipped": skipped, "kinds": {}}
    for kind in [k for k in kinds if k in present] or present[:2]:
        mods = [m for m in common if _kind_layer(m)[0] == kind]
        mid = len(mods) // 2
        svd1 = [delta_svd(a1.lora_A[m], a1.lora_B[m], a1.scaling_for(m)) for m in mods]
        svd2 = [delta_svd(a2.lora_A[m], a2.lora_B[m], a2.scaling_for(m)) for m in mods]
        grids = {"A": [similarity_grid(a1.lora_A[m], a2.lora_A[m]) for m in mods],  # the paper's measure
                 "delta_in": [basis_similarity_grid(x[2], y[2]) for x, y in zip(svd1, svd2)],  # right vectors
                 "delta_out": [basis_similarity_grid(x[0].T, y[0].T) for x, y in zip(svd1, svd2)]}  # left vectors
        entry = {"modules": len(mods), "middle_module": mods[mid], "middle_layer": _kind_layer(mods[mid])[1],
                 "in_features": a1.lora_A[mods[mid]].shape[1], "out_features": a1.lora_B[mods[mid]].shape[0]}
        for name, values in grids.items():
            mean = torch.stack(values).mean(0)
            entry |= {f"grid_{name}_middle": values[mid].tolist(), f"grid_{name}_mean": mean.tolist(),
                      f"phi_top1_{name}": float(mean[0, 0]), f"phi_top1_in_all_{name}": float(mean[0, -1])}
        out["kinds"][kind] = entry
    return out


def analyze(adapter_dir: str | Path, base_dir: str | Path | None = None, compare_to: str | Path | None = None,
            out_dir: str | Path = "analysis", top_k: tuple[int, ...] = (1, 2, 4, 8),
            compare_kinds: tuple[str, ...] = ("q_proj", "v_proj"), plots: bool = True, force: bool = False) -> Report:
    """Every analysis on one adapter, optionally against its base checkpoint (amplification, NF4
    error) and a second adapter (subspace similarity on the modules both adapt, for `compare_kinds`);
    writes report.md, report.json and PNG plots into `out_dir`. The NF4 error uses the quantization
    recorded beside the adapter (settings.py), and a base other than the recorded one is refused
    unless `force`."""
    from . import plots as plotting

    adapter = _as_adapter(adapter_dir)
    settings = read_settings(adapter.path)
    quant = quant_for(settings, None, adapter.path) or QuantConfig()
    if base_dir is not None:
        check_base(settings, base_dir, force)
    base = _BaseWeights(Path(base_dir)) if base_dir is not None else None
    # the per-module analyses read one A/B pair as one ΔW; an expert projection holds one pair per expert
    # (experts.py), so they cover the linears; `account` counts the experts too
    linears = [m for m in adapter.modules if m not in adapter.experts]
    modules = [_module_stats(adapter, m, top_k, base, quant) for m in _model_order(linears)]
    comparison = _compare(adapter, _as_adapter(compare_to), compare_kinds) if compare_to is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if plots:
        files += plotting.plot_spectra(modules, out / "spectra.png")
        files += plotting.plot_truncation(modules, out / "truncation_error.png")
        if base is not None:
            files += plotting.plot_amplification(modules, out / "amplification.png")
        if comparison:
            files += plotting.plot_similarity(comparison, out / "subspace_similarity.png")
    report = Report(str(adapter.path), account(adapter, base_dir), modules, comparison, out, files,
                    gpt3_175b_accounting())
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    (out / "report.md").write_text(_markdown(report))
    report.files += [out / "report.json", out / "report.md"]
    return report


def headline(report: Report) -> list[str]:
    """2–4 short lines for a demo summary."""
    mods, acc, c = report.modules, report.accounting, report.comparison
    e1, e4 = (_stat(m.energy.get(k) for m in mods) for k in (1, 4))
    lines = [f"trainable {acc.trainable_params:,} params"
             + (f" = {100 * acc.trainable_ratio:.2f}% of {acc.total_params:,}" if acc.trainable_ratio else "")
             + f"; adapter {_size(acc.adapter_file_bytes)} on disk",
             f"ΔW over {len(mods)} modules (r={mods[0].r}): "
             f"mean effective rank {_stat(m.effective_rank for m in mods):.2f}"
             + (f", energy in top-1 {100 * e1:.0f}%" if e1 is not None else "")
             + (f", top-4 {100 * e4:.0f}%" if e4 is not None else "")]
    if mods[0].base:
        factor, vs_random, nf4 = (_stat((m.base.get(k) for m in mods), "median")
                                  for k in ("factor", "vs_random", "nf4_error_over_delta"))
        lines.append(f"median amplification ‖ΔW‖/‖UᵀWV‖ {factor:.2f}×; W along ΔW's directions "
                     f"{vs_random:.1f}× random ones" + (f"; NF4 error of W0 = {nf4:.1f}× ‖ΔW‖" if nf4 else ""))
    if c and c["kinds"]:
        parts = [f"{k} A {v['phi_top1_A']:.2f}, ΔW out {v['phi_top1_delta_out']:.2f}" for k, v in c["kinds"].items()]
        lines.append(f"top direction, r={c['r1']} vs r={c['r2']}: φ(1,1) " + "; ".join(parts) + " (random: ~1/dim)")
    return lines


def _size(n: float | None) -> str:
    if n is None:
        return "–"
    unit, factor = next(((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= f), ("B", 1))
    return f"{n / factor:,.1f} {unit}"


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _kind_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    ks = sorted({k for m in report.modules for k in m.energy})
    has_base = bool(report.modules[0].base)
    head = ["kind", "modules", "r", "eff. rank"] + [f"energy top-{k}" for k in ks]
    head += ["amplification", "with random U, V", "‖UᵀWV‖ ΔW dirs / random", "‖ΔW‖ / ‖W‖",
             "NF4 err / ‖W0‖", "NF4 err / ‖ΔW‖"] if has_base else []
    kinds: dict[str, list[ModuleStats]] = {}
    for m in report.modules:  # model order: q, k, v, o, gate, up, down
        kinds.setdefault(m.kind, []).append(m)
    rows = []
    for kind, mods in kinds.items():
        row = [kind, str(len(mods)), str(mods[0].r), _fmt(_stat(m.effective_rank for m in mods), ".2f")]
        row += [_fmt(_stat(m.energy.get(k) for m in mods)) for k in ks]
        if has_base:
            medians = [[m.base["factor"] for m in mods], [m.base["factor_random"] for m in mods],
                       [m.base["vs_random"] for m in mods], [m.base["delta_fro"] / m.base["w_fro"] for m in mods]]
            row += [_fmt(_stat(v, "median"), s) for v, s in zip(medians, (".2f", ".2f", ".2f", ".4f"))]
            row += [_fmt(_stat(m.base.get("nf4_error_rel") for m in mods), ".4f"),
                    _fmt(_stat((m.base.get("nf4_error_over_delta") for m in mods), "median"), ".2f")]
        rows.append(row)
    return head, rows


def _markdown(report: Report) -> str:
    acc, g, c = report.accounting, report.gpt3, report.comparison
    ratio = None if acc.trainable_ratio is None else 100 * acc.trainable_ratio
    lines = [f"# Adapter analysis: `{report.adapter}`", "", *[f"- {h}" for h in headline(report)], "",
             "## Accounting", ""] + _table(["quantity", "value"], [
        ["trainable parameters", f"{acc.trainable_params:,}"],
        ["base parameters (checkpoint; tied weights once)", _fmt(acc.total_params, ",")],
        ["trainable / total", f"{_fmt(ratio)} %"], ["adapter file", _size(acc.adapter_file_bytes)],
        ["full 16-bit checkpoint (computed; files on disk)",
         f"{_size(acc.full_16bit_bytes)}; {_size(acc.checkpoint_file_bytes)}"],
        ["NF4 base (linears NF4, the rest 16-bit)", _size(acc.nf4_base_bytes)],
        ["Adam state (fp32 m + v), LoRA / full fine-tuning",
         f"{_size(acc.lora_optimizer_bytes)} / {_size(acc.full_ft_optimizer_bytes)}"]])
    lines += ["", "## Per module kind", "",
              "Means over layers; the amplification columns and NF4 err / ‖ΔW‖ are medians.", ""]
    lines += _table(*_kind_rows(report))
    if c:
        skipped = ", ".join(f"{k} {len(v)} (e.g. {v[0]})" for k, v in c["skipped"].items() if v) or "none"
        lines += ["", f"## Subspace similarity with `{c['compare_to']}` (r={c['r1']} vs r={c['r2']})", "",
                  f"{c['common']} common modules; skipped: {skipped}.", "",
                  "φ(1,1): top direction vs top direction; φ(1,r2): the top direction inside the whole r2 span. "
                  "Random subspaces score max(i, j)/dim on average: dim = in for A and ΔW's in-space "
                  "(right singular vectors), out for ΔW's out-space (left).", ""]
        head = ["kind", "in / out"] + [f"{n} φ(1,{j})" for n in ("A", "ΔW in", "ΔW out") for j in ("1", "r2")]
        lines += _table(head + ["chance φ(1,1) / φ(1,r2), in", "out"],
                        [[kind, f"{v['in_features']} / {v['out_features']}"]
                         + [f"{v[f'phi_top1{p}_{n}']:.3f}" for n in ("A", "delta_in", "delta_out")
                            for p in ("", "_in_all")]
                         + [f"{1 / v[d]:.4f} / {c['r2'] / v[d]:.3f}" for d in ("in_features", "out_features")]
                         for kind, v in c["kinds"].items()])
    lines += ["", "## Plots", ""] + [f"![{f.stem}]({f.name})" for f in report.files if f.suffix == ".png"]
    lines += ["", "## GPT-3 175B, computed (the LoRA paper's setting)", "",
              f"r={g['r']} on Wq, Wv of 96 layers: {g['trainable_params']:,} trainable parameters, "
              f"{g['fewer_trainable_x']:,.0f}× fewer than 175B (paper: ~10,000×); adapter "
              f"{_size(g['adapter_16bit_bytes'])} in 16-bit vs {_size(g['full_16bit_bytes'])} "
              f"(paper: {g['paper_claim_checkpoint']}).", ""]
    return "\n".join(lines)


def analyze_command(adapter: str, base: str | None = None, compare: str | None = None, out: str = "analysis",
                    json_output: bool = False, force: bool = False) -> str:
    """`qlora-lite analyze`: run `analyze` and return the text to print. `base="embedded"` selects the
    shipped model; without `base`, the adapter config's base_model_name_or_path is used if it is a local
    model directory. `force`: analyse against a base other than the one recorded with the adapter."""
    note = ""
    if base == "embedded":
        from .embedded import embedded_model_dir

        base = str(embedded_model_dir())
    elif base is None:
        guess = _as_adapter(adapter).config.get("base_model_name_or_path")
        if guess and (Path(guess) / "config.json").is_file():
            base, note = guess, f"base: {guess} (from adapter_config.json)"
    report = analyze(adapter, base, compare, out, force=force)
    if json_output:
        return json.dumps(report.to_dict(), indent=1, default=str)
    return "\n".join([*headline(report), *([note] if note else []), f"report: {out}/report.md",
                      *[f"plot: {f}" for f in report.files if f.suffix == ".png"]])
