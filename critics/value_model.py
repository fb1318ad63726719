"""The mini-critic's value model: a causal-LM backbone plus a scalar value head (docs/algorithms.md §2).

Pure PyTorch + transformers, no Ray.

The value head is zero-initialised (weight and bias): every critic built from the same checkpoint then starts
from the *same* function (V ≡ 0) without having to share a random seed, as AsyPPO requires (critic diversity
comes from the data alone), and the first advantages are the plain returns. The head still learns from the
first step because its gradient is ``dL/dV · hidden``, which is non-zero; the backbone follows once the head
is non-zero.

On disk a value model is a Hugging Face backbone directory (``save_pretrained`` of the base model, loadable
by ``AutoModel``) plus ``value_head.safetensors`` holding the head's ``weight`` and ``bias``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

__all__ = ["VALUE_HEAD_FILE", "ValueModel"]

VALUE_HEAD_FILE = "value_head.safetensors"


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded sequences: ``cumsum(mask) − 1`` clamped at 0 (project batch layout)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _first_layers(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """``config`` cut to its first ``num_layers`` decoder layers (and their per-layer settings, where it has them)."""
    if num_layers > config.num_hidden_layers:
        raise ValueError(f"ValueModel: cannot keep {num_layers} layers of a model with {config.num_hidden_layers}")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    return config


class ValueModel(torch.nn.Module):
    """``V(s)`` for every position of a token sequence: backbone hidden state → ``Linear(hidden, 1)``.

    Build it with :meth:`from_pretrained` (any local causal-LM or value-model directory) or
    :meth:`from_config`; ``ValueModel(backbone)`` wraps an already built base model (no LM head).
    """

    def __init__(self, backbone: PreTrainedModel, value_head: torch.nn.Linear | None = None) -> None:
        super().__init__()
        hidden_size = getattr(backbone.config, "hidden_size", None)
        if hidden_size is None:
            raise ValueError(f"ValueModel: backbone config {type(backbone.config).__name__} has no hidden_size")
        self.backbone = backbone
        if value_head is None:
            value_head = torch.nn.Linear(hidden_size, 1, dtype=backbone.dtype)
            torch.nn.init.zeros_(value_head.weight)
            torch.nn.init.zeros_(value_head.bias)
        elif value_head.in_features != hidden_size or value_head.out_features != 1:
            raise ValueError(
                f"ValueModel: value_head must be Linear({hidden_size}, 1), got Linear({value_head.in_features}, "
                f"{value_head.out_features})"
            )
        self.value_head = value_head

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    @classmethod
    def from_config(cls, config: PretrainedConfig, num_layers: int | None = None, **kwargs) -> ValueModel:
        """Randomly initialised backbone of ``config``'s architecture (e.g. a ``Qwen2Config``), cut to its first
        ``num_layers`` decoder layers when given, + zero head."""
        if num_layers is not None:
            config = _first_layers(config, num_layers)
        return cls(AutoModel.from_config(config, **kwargs))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        num_layers: int | None = None,
        **kwargs,
    ) -> ValueModel:
        """Load a local directory: a saved :class:`ValueModel` (backbone + ``value_head.safetensors``) or any
        Hugging Face causal-LM checkpoint (its LM head is dropped and a zero value head is created).

        ``torch_dtype`` sets the dtype of the backbone and of the head; ``num_layers`` keeps the embeddings, the
        first ``num_layers`` decoder layers and the final norm (a mini-critic cut from a larger model, docs/
        algorithms.md §2; the layers beyond are not loaded); other kwargs go to ``AutoModel.from_pretrained``.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"ValueModel.from_pretrained: {path} is not a directory")
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if num_layers is not None:
            kwargs["config"] = _first_layers(AutoConfig.from_pretrained(path), num_layers)
        backbone = AutoModel.from_pretrained(path, **kwargs)
        model = cls(backbone)
        head_file = path / VALUE_HEAD_FILE
        if head_file.is_file():
            state = load_file(str(head_file))
            expected = {"weight", "bias"}
            if set(state) != expected:
                raise ValueError(f"ValueModel.from_pretrained: {head_file} holds {sorted(state)}, expected {sorted(expected)}")
            head = model.value_head
            state = {name: tensor.to(dtype=head.weight.dtype) for name, tensor in state.items()}
            head.load_state_dict(state)
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the backbone with Hugging Face ``save_pretrained`` and the head to ``value_head.safetensors``."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(save_directory, **kwargs)
        head_state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.value_head.state_dict().items()}
        save_file(head_state, str(save_directory / VALUE_HEAD_FILE))

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Activation checkpointing of the backbone (trades compute for memory during critic training)."""
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"ValueModel: input_ids and attention_mask must be equal [N, L], got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=_position_ids(attention_mask),
            use_cache=False,
        )
        return outputs.last_hidden_state

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values at every position, ``[N, L]`` float32; position ``p`` holds V of the state after token ``p``."""
        return self._head(self._hidden_states(input_ids, attention_mask))

    def response_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int
    ) -> torch.Tensor:
        """``V(s_t)`` for the ``T = response_len`` response tokens, ``[N, T]`` float32 (docs/algorithms.md §2).

        Response token ``t`` sits at ``Lp+t``; its state ``s_t`` is the hidden state at ``Lp+t−1`` (before the
        token is emitted), so this returns positions ``[Lp−1, Lp+T−1)``.
        """
        total_len = input_ids.shape[-1]
        prompt_len = total_len - response_len
        if response_len < 1 or prompt_len < 1:
            raise ValueError(
                f"ValueModel.response_values: need 1 <= response_len < sequence length, got response_len="
                f"{response_len} for length {total_len}"
            )
        hidden = self._hidden_states(input_ids, attention_mask)
        return self._head(hidden[:, prompt_len - 1 : total_len - 1])
