"""The oracle for layer-by-layer forwards: our chain of single layers against transformers' model."""

from __future__ import annotations

import torch

from rose import checkpoint as ck
from rose import family


def layer_chain(path, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Embeddings and every layer's output, one layer built at a time (what the stages run)."""
    checkpoint = ck.Checkpoint.open(path)
    fam = family.family_for(checkpoint.config)
    hidden = family.embed(checkpoint.read(fam.embed_name), tokens, fam)
    states = [hidden]
    with torch.no_grad():
        for index in range(checkpoint.num_layers()):
            tensors = checkpoint.read_prefix(fam.layer_prefix.format(index=index))
            layer = family.build_layer(checkpoint.config, index, tensors, "cpu", torch.float32)
            hidden = family.layer_forward(layer, checkpoint.config, hidden)
            states.append(hidden)
    return states


def full_model_states(model, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden_states[k] is the input of layer k; the last entry has the final norm applied."""
    with torch.no_grad():
        return model(tokens, output_hidden_states=True).hidden_states


def relative_change_when(path, tokens: torch.Tensor, **config_changes) -> float:
    """How much the full model's last hidden state moves when its config changes: an oracle
    comparison only proves a feature when turning the feature off changes the output."""
    from transformers import AutoModelForCausalLM

    def last(**changes):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **changes).eval()
        return full_model_states(model, tokens)[-1]

    on, off = last(), last(**config_changes)
    return float((on - off).abs().max() / on.abs().max())
