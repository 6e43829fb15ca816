"""Shared fixtures. GPU tests carry @pytest.mark.gpu and are skipped without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lite.threads import pick_threads

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # `pytest -n N` (make test: 2)
if _WORKERS > 1 and not os.environ.get("OMP_NUM_THREADS"):
    # the workers share the cores: one share each, also in the processes the tests start (they inherit it),
    # since a thread that waits for a core makes every op's OpenMP barrier wait (see pick_threads)
    _SHARE = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)
    torch.set_num_threads(_SHARE)
else:
    torch.set_num_threads(pick_threads(max_threads=2))  # 1 on a busy machine: see pick_threads
ROOT = Path(__file__).resolve().parents[1]
# modules whose module-scoped fixtures train the real model: all their tests in one xdist worker
ONE_WORKER_MODULES = ("test_real_model.py", "test_adapter_precision.py")
# A guard against a hung process (a deadlocked launcher), never a speed limit: a busy machine is slower, not wrong.
HANG_S = 3600


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        # under `pytest -n 2 --dist loadgroup`: the demo runs once, in the worker that runs every test
        # that reads it; so do the modules whose tests share training runs of the real model in module
        # fixtures (split over two workers, each worker trained them: the NF4 run of test_real_model twice);
        # launchers (torchrun's default port) never run side by side. (pytest 9.2 keeps node ids where
        # pytest-xdist 3.8 cannot rename them, and the groups silently stop working: pytest 9.1.1.)
        if "demo_run" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("demo"))
        elif item.path.name in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
        elif item.path.name == "test_distributed.py":
            item.add_marker(pytest.mark.xdist_group("launchers"))
    if torch.cuda.is_available():
        return
    # scripts/gpu_check.sh --cpu-smoke runs the device-generic GPU tests (tests/test_gpu.py) on the CPU.
    smoke = os.environ.get("QLORA_LITE_GPU_SMOKE") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not (smoke and item.path.name == "test_gpu.py"):
            item.add_marker(skip_gpu)


def _single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run ~30x faster on one thread when the 2 cores are shared
    (OpenMP oversubscription). Modules that want it for every test: pytestmark = usefixtures("one_thread")."""
    yield from _single_torch_thread()


@pytest.fixture(scope="module")
def one_thread_per_module():
    """`one_thread` for a whole module, its module-scoped fixtures included."""
    yield from _single_torch_thread()


@pytest.fixture(scope="session")
def embedded_dir():
    """The embedded SmolLM2-135M-Instruct as a standard HF directory (converted once per cache, about 30 s)."""
    from qlora_lite.embedded import embedded_model_dir

    return embedded_model_dir()


# The demo the tests run: the user's flow (answers before/after, held-out loss before and after training,
# merged and verified checkpoint, plots, summary) at 4 steps instead of 20, answers of 12 tokens instead of 20
# and 2 held-out evaluations of the first 8 held-out examples instead of 3 of 16, the merge verified on the
# first 2 of verify.DEFAULT_PROMPTS (379 tokens; test_merge's embedded-model test verifies a merge on all 5):
# 70 s on a quiet machine at 1 thread, a third of `make demo`'s CPU time (docs/benchmarks.md). Measured at 4
# steps: held-out loss 4.85 -> 1.76, both answers after start "Ahoy!" (none before).
DEMO_TEST = dict(steps=4, max_new_tokens=12, eval_every=4)
DEMO_TEST_EVAL_EXAMPLES = 8
DEMO_TEST_VERIFY_PROMPTS = 2


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, embedded_dir):
    """One demo (`run_demo`, what `qlora-lite demo` runs, in a subprocess), shared by every test that checks
    what it wrote; `test_cli_demo_hands_its_options_to_run_demo` checks the command line's part.

    No wall-clock limit: on a busy machine the demo is slower, not wrong (issue 24).
    """
    out = tmp_path_factory.mktemp("demo") / "run"
    code = ("import sys; from qlora_lite import train, verify; from qlora_lite.demo import run_demo; "
            f"train.MAX_EVAL_EXAMPLES = {DEMO_TEST_EVAL_EXAMPLES}; "
            f"verify.DEFAULT_PROMPTS = verify.DEFAULT_PROMPTS[:{DEMO_TEST_VERIFY_PROMPTS}]; "
            f"run_demo(sys.argv[1], **{DEMO_TEST!r})")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def tiny_llama_config(**overrides):
    """The tests' one tiny Llama configuration (TINY, vocabulary 256) with `overrides`."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, "vocab_size": 256, **overrides})


def tiny_lora_llama(config, lora, quant=None, checkpointing: bool = True, seed: int = 0):
    """A tiny Llama from `config` with LoRA injected (NF4 base by default), in train mode, seeded."""
    from transformers import LlamaForCausalLM

    from qlora_lite.config import QuantConfig
    from qlora_lite.inject import inject_lora
    from qlora_lite.train import enable_checkpointing

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    inject_lora(model, lora, QuantConfig() if quant is None else quant)
    if checkpointing:
        enable_checkpointing(model)
    return model.train()


def loss_and_grads(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward/backward on ids (as labels too): the loss and every trainable gradient, then zeroed."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def write_tiny_model(directory, tokenizer_dir=None, seed: int = 0, vocab_size: int | None = None,
                     max_shard_size: int | str = "2GB", **overrides):
    """A tiny random Llama saved as safetensors (with the embedded tokenizer when given)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else None
    vocab = vocab_size or (len(tokenizer) if tokenizer else 256)
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=vocab, **overrides)
    if tokenizer is not None:
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


MEMORIZE = [
    {"messages": [{"role": "user", "content": f"What is the code word number {i}?"},
                  {"role": "assistant", "content": f"The code word number {i} is {word}."}]}
    for i, word in enumerate(["apple", "river", "cobalt", "lantern", "meadow", "quartz", "falcon", "ember"])
]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def write_tiny_tokenizer(directory, texts) -> None:
    """A word-level tokenizer over `texts` with a chat template: a vocabulary of ~100, so tiny
    models train in seconds."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)} | {"user", "assistant", "system"})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny") / "model"
    texts = [m["content"] for r in MEMORIZE for m in r["messages"]]
    write_tiny_tokenizer(directory, texts)
    return write_tiny_model(directory, directory)


@pytest.fixture(scope="session")
def memorize_data(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("data") / "memorize.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MEMORIZE * 4))
    return path
