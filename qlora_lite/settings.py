"""The run settings that travel with an adapter and a training checkpoint: what rebuilds its model.

    adapter_dir/qlora_lite.json   {"format": 1,
                                   "quant": {"quant_type", "blocksize", "double_quant"} | null (16-bit LoRA),
                                   "compute_dtype": "bfloat16", "lora": {"init_lora_weights", "lora_dtype"},
                                   "base": {"path", "prequantized", "fingerprint": {"config_sha256", "tensors"}}}

PEFT reads only adapter_config.json and the weights, so the file beside them leaves the adapter
PEFT-loadable. `merge`, `verify`, `generate` and `analyze` rebuild the base with the recorded
quantization (`quant_for`) and refuse a base whose fingerprint differs (`check_base`); a resumed run
compares every model-shaping setting with its checkpoint's (`check_resume`).

The fingerprint is cheap (a few MiB read, nothing loaded): a hash of config.json without the keys a
re-save or a 4-bit export changes, and hashes of the first and last bytes of a few tensors picked by
name. Tensors stored in another dtype (a linear as NF4 bytes in a `qlora-lite quantize` export of
the same model) are not compared, so an adapter trained on the export merges onto its original.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig, QuantConfig, resolve_lora_dtype
from .errors import CheckpointError, ConfigError
from .shards import read_header

__all__ = ["SETTINGS_NAME", "RunSettings", "fingerprint_base", "read_settings", "quant_for", "check_base",
           "check_resume", "describe_quant"]

SETTINGS_NAME = "qlora_lite.json"
FORMAT = 1
QUANT_FIELDS = ("quant_type", "blocksize", "double_quant")  # what decides the NF4 bytes (not the backend)
_VOLATILE_CONFIG_KEYS = ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype")
_EDGE_BYTES = 512 * 1024  # hashed at each end of a fingerprinted tensor
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                   ".quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class RunSettings:
    """Every setting that shapes the model an adapter was trained on (see the module docstring)."""

    quant: dict[str, Any] | None
    compute_dtype: str
    lora: dict[str, Any]
    base: dict[str, Any]

    @classmethod
    def for_run(cls, base_dir: str | Path, quant: QuantConfig | None, lora: LoraConfig,
                compute_dtype: torch.dtype, device: str | torch.device | None = None) -> RunSettings:
        """What this run trains with; `lora_dtype: auto` is recorded as the dtype it resolved to on
        `device`, so that a reader never has to guess which device the adapter was trained on."""
        base_dir = Path(base_dir)
        factors = resolve_lora_dtype(lora.lora_dtype, compute_dtype, device)
        lora = dataclasses.replace(lora, lora_dtype=str(factors).removeprefix("torch."))
        recorded = _checkpoint_quant(base_dir) or (None if quant is None else
                                                   {k: getattr(quant, k) for k in QUANT_FIELDS})
        return cls(recorded, str(compute_dtype).removeprefix("torch."), dataclasses.asdict(lora),
                   {"path": str(base_dir), "prequantized": _prequant_config(base_dir) is not None,
                    "fingerprint": fingerprint_base(base_dir)})

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> RunSettings:
        try:
            return cls(values["quant"], str(values["compute_dtype"]), dict(values["lora"]), dict(values["base"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where} is not a qlora-lite settings file (missing or bad {exc}); delete it to "
                                  "treat the adapter as a plain PEFT adapter") from None

    def write(self, directory: Path) -> None:
        (directory / SETTINGS_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def read_settings(directory: str | Path) -> RunSettings | None:
    """The settings beside an adapter, or None for an adapter written elsewhere (PEFT)."""
    path = Path(directory) / SETTINGS_NAME
    if not path.is_file():
        return None
    return RunSettings.from_dict(_json_object(path, "restore it from the run's checkpoint"), str(path))


def describe_quant(quant: dict[str, Any] | QuantConfig | None) -> str:
    if quant is None:
        return "no quantization (16-bit LoRA)"
    values = quant if isinstance(quant, dict) else {k: getattr(quant, k) for k in QUANT_FIELDS}
    return ", ".join(f"{k}={str(values[k]).lower() if isinstance(values[k], bool) else values[k]}"
                     for k in QUANT_FIELDS)


def quant_for(settings: RunSettings | None, passed: QuantConfig | dict[str, Any] | None,
              adapter_dir: str | Path) -> QuantConfig | None:
    """The quantization that rebuilds the adapter's base: the recorded one. What a caller passes
    (a QuantConfig, or a dict of the fields a user gave on the command line) must agree with it;
    an adapter without settings (PEFT's) takes what was passed over the defaults."""
    given = dict(passed) if isinstance(passed, dict) else (
        {} if passed is None else {k: getattr(passed, k) for k in QUANT_FIELDS})
    given = {k: v for k, v in given.items() if v is not None}
    keep = passed if isinstance(passed, QuantConfig) else QuantConfig()  # the backend and compute dtype passed
    if settings is None:
        return dataclasses.replace(keep, **given)
    if settings.quant is None:
        return None
    differ = {k: (settings.quant[k], v) for k, v in given.items() if k in settings.quant and settings.quant[k] != v}
    if differ:
        pairs = "; ".join(f"{k}={_show(v)} was passed but the adapter was trained with {k}={_show(r)}"
                          for k, (r, v) in differ.items())
        raise ConfigError(f"{pairs} ({Path(adapter_dir) / SETTINGS_NAME}); drop the option to use the adapter's "
                          "settings", "quantization settings")
    return dataclasses.replace(keep, **settings.quant)


def check_base(settings: RunSettings | None, base_dir: str | Path, force: bool = False) -> None:
    """Refuse a base that is not the one the adapter was trained on (unless `force`)."""
    if settings is None or force:
        return
    recorded, actual = settings.base.get("fingerprint"), fingerprint_base(base_dir)
    problem = _fingerprint_difference(recorded, actual) if recorded else None
    if problem:
        raise CheckpointError(f"{base_dir} is not the base this adapter was trained on ({settings.base.get('path')}): "
                              f"{problem}; pass the right base, or force=True (--force true) to use it anyway")


def check_resume(recorded: dict[str, Any] | None, current: RunSettings, checkpoint: Path) -> None:
    """Refuse to resume with another base, quantization, compute dtype or LoRA shape than the checkpoint's."""
    if recorded is None:
        return
    before = RunSettings.from_dict(recorded, str(checkpoint / "trainer_state.json"))
    problem = _fingerprint_difference(before.base.get("fingerprint"), current.base["fingerprint"])
    if problem:
        raise CheckpointError(f"{checkpoint} was trained on {before.base.get('path')} but this run's model "
                              f"{current.base['path']} is another base ({problem}); resume with the same model")
    pairs = [("quantization", describe_quant(before.quant), describe_quant(current.quant)),
             ("compute_dtype", before.compute_dtype, current.compute_dtype)]
    defaults = dataclasses.asdict(LoraConfig())  # a field added since the checkpoint was written had its default
    pairs += [(f"lora.{k}", _show(before.lora.get(k, defaults.get(k))), _show(v)) for k, v in current.lora.items()]
    for name, old, new in pairs:
        if old != new:
            raise CheckpointError(f"{checkpoint} was written with {name} {old} but this run has {new}; resume with "
                                  f"the checkpoint's settings, or start a new run in another out_dir")


def fingerprint_base(base_dir: str | Path) -> dict[str, Any]:
    """{"config_sha256", "tensors": {name: {"dtype", "shape", "sha256"}}} of a model directory (a few MiB read)."""
    from .load import checkpoint_files

    base_dir = Path(base_dir)
    files = checkpoint_files(base_dir)
    config = _read_config(base_dir)
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    entries = {name: (file, entry) for file in files for name, entry in read_header(file).items()
               if not name.endswith(_QUANT_SUFFIXES)}
    names = sorted(entries)
    chosen = sorted(set(names[:2] + names[-2:]))  # e.g. the head/embedding, the first norm, the last layer, the norm
    tensors = {}
    for name in chosen:
        file, entry = entries[name]
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            head = min(entry.nbytes, _EDGE_BYTES)
            digest.update(os.pread(handle.fileno(), head, entry.start))
            tail = min(entry.nbytes - head, _EDGE_BYTES)
            if tail:
                digest.update(os.pread(handle.fileno(), tail, entry.end - tail))
        tensors[name] = {"dtype": str(entry.dtype).removeprefix("torch."), "shape": list(entry.shape),
                         "sha256": digest.hexdigest()}
    return {"config_sha256": config_hash, "tensors": tensors}


def _fingerprint_difference(recorded: dict[str, Any] | None, actual: dict[str, Any]) -> str | None:
    """None if `actual` is the recorded base, else one phrase naming both values."""
    if not recorded:
        return None
    if recorded.get("config_sha256") != actual["config_sha256"]:
        return (f"config.json hash {actual['config_sha256'][:12]} differs from the recorded "
                f"{str(recorded.get('config_sha256'))[:12]}")
    compared = 0
    for name, want in (recorded.get("tensors") or {}).items():
        got = actual["tensors"].get(name)
        if got is None or got["dtype"] != want.get("dtype"):
            continue  # stored differently (a 4-bit export of the same model): not comparable
        compared += 1
        if got["sha256"] != want.get("sha256"):
            return f"tensor {name} checksum {got['sha256'][:12]} differs from the recorded {str(want.get('sha256'))[:12]}"
    if not compared:
        return "none of the recorded tensors is stored in the same dtype, so the weights cannot be compared"
    return None


def _json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; anything else is a CheckpointError naming the file and `fix`."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return values


def _read_config(base_dir: Path) -> dict[str, Any]:
    return _json_object(base_dir / "config.json", "re-save the model")


def _prequant_config(base_dir: Path) -> dict[str, Any] | None:
    quantization = _read_config(base_dir).get("quantization_config")
    return quantization if isinstance(quantization, dict) else None


def _checkpoint_quant(base_dir: Path) -> dict[str, Any] | None:
    """A 4-bit checkpoint's own NF4 settings (its quant-state JSON wins over the run's QuantConfig)."""
    if _prequant_config(base_dir) is None:
        return None
    from .load import checkpoint_files
    from .shards import ShardReader

    for file in checkpoint_files(base_dir):
        with ShardReader(file) as reader:
            for name in reader.keys():
                if name.endswith(".quant_state.bitsandbytes__nf4"):
                    state = json.loads(bytes(reader.get(name).tolist()).decode())
                    nested = any(k.endswith(".nested_absmax") for k in reader.keys())
                    return {"quant_type": state.get("quant_type", "nf4"), "blocksize": int(state["blocksize"]),
                            "double_quant": nested}
    return None


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
