"""One dense decoder layer over the calibration inputs: what the Hessian and OWL stages share.

A layer is rebuilt from the checkpoint (never the whole model) and its inputs
are streamed from HDF5, so memory stays at one layer whatever the model size.
Hooks on the Linears' inputs (and, in a mixture-of-experts layer, on the experts
module's input, with the router's real choice) feed one accumulator per input
group: `HessianAccumulator` for the Hessians, `ColumnNorms` for OWL's statistic.

What a layer prunes is its units (`family.LayerUnits`): each Linear, and in a
mixture-of-experts layer each routed expert's gate, up and down matrices
(slices of transformers' stacked parameters or the checkpoint's per-expert tensors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rose import family
from rose.artifacts import ArtifactError, H5Artifact, MemoryH5, open_h5, prefetch
from rose.checkpoint import Checkpoint
from rose.config import RunConfig
from rose.handoff import Handoff
from rose.hessian import HessianAccumulator
from rose.stages.spec import StageContext

log = logging.getLogger("rose")

HIDDEN = "hidden"  # the dataset of a layer-inputs artifact: [sequences, seqlen, hidden]


def layer_units(cfg: RunConfig, checkpoint: Checkpoint, layer: int) -> family.LayerUnits:
    """What layer `layer` prunes, named as the checkpoint names its tensors."""
    fam = family.family_for(checkpoint.config)
    names = checkpoint.layer_names(fam.layer_prefix.format(index=layer))
    return family.layer_units(checkpoint.config, layer, names, cfg.moe.prune_router)


def read_unit(checkpoint: Checkpoint, prefix: str, unit: family.Unit) -> torch.Tensor:
    """A unit's weight [out, in] from the checkpoint (one expert's slice of a stacked tensor)."""
    if unit.index is None:
        return checkpoint.read(prefix + unit.tensor)
    return checkpoint.read_slice(prefix + unit.tensor, unit.index, unit.rows)


def build_module(
    ctx: StageContext, layer: int, replace: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """Decoder layer `layer` from the checkpoint on the step's device and dtype; `replace`
    swaps in tensors of the same names and shapes (a pruned layer's)."""
    checkpoint = ctx.checkpoint
    tensors = checkpoint.read_prefix(ctx.family.layer_prefix.format(index=layer))
    for name, tensor in (replace or {}).items():
        if name not in tensors:
            raise ArtifactError(f"layer {layer}: pruned tensor {name} is not part of the model")
        if tuple(tensor.shape) != tuple(tensors[name].shape):
            raise ArtifactError(
                f"layer {layer}: pruned {name} has shape {tuple(tensor.shape)}, "
                f"the model has {tuple(tensors[name].shape)}"
            )
        tensors[name] = tensor
    return family.build_layer(checkpoint.config, layer, tensors, device=ctx.device, dtype=ctx.dtype)


def unit_weight(module: torch.nn.Module, unit: family.Unit) -> torch.Tensor:
    """A unit's weight inside the built layer (transformers' names and layout)."""
    if unit.expert is None:
        return module.get_submodule(unit.module).weight
    experts = module.get_submodule(family.EXPERTS)
    if unit.part == "down":
        return experts.down_proj[unit.expert]
    inter = experts.gate_up_proj.shape[1] // 2
    return (
        experts.gate_up_proj[unit.expert, :inter]
        if unit.part == "gate"
        else experts.gate_up_proj[unit.expert, inter:]
    )


def hidden_batches(
    path: Path, expected: dict[str, Any], batch: int, handoff: Handoff | None = None
) -> tuple[H5Artifact | MemoryH5, Iterator[torch.Tensor]]:
    """A layer-inputs artifact and its sequences in batches, read ahead in a thread."""
    artifact = open_h5(path, expected, handoff)
    return artifact, prefetch(artifact.iter_tensors(HIDDEN, batch))


def log_progress(stage: str, done: int, total: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / max(done, 1) * (total - done)
    log.info("%s: %d/%d samples, %.1fs elapsed, ETA %.1fs", stage, done, total, elapsed, eta)


def _expert_intermediate(experts: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """act(gate(x)) * up(x) of one expert: the input of its down projection, computed with the
    experts module's own gating function (the one its forward applies)."""
    gate_up = torch.nn.functional.linear(x, experts.gate_up_proj[expert])
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def expert_unit(units: family.LayerUnits, expert: int, part: str) -> str:
    for name, unit in units.units.items():
        if unit.expert == expert and unit.part == part:
            return name
    raise KeyError(f"expert {expert} {part}")


@dataclass
class DenseLayer:
    """A dense decoder layer ready to run over its calibration inputs."""

    ctx: StageContext
    layer: int
    inputs: Path
    expected: dict[str, Any]  # the inputs' provenance
    units: family.LayerUnits = field(init=False)
    module: torch.nn.Module = field(init=False)
    widths: dict[str, int] = field(init=False)  # each unit's input width
    shape: tuple[int, ...] = field(init=False)  # the inputs': [sequences, seqlen, hidden]

    def __post_init__(self) -> None:
        self.units = layer_units(self.ctx.cfg, self.ctx.checkpoint, self.layer)
        self.module = build_module(self.ctx, self.layer)
        self.widths = {}
        for name in self.units.names():
            weight = unit_weight(self.module, self.units.units[name])
            if not bool(torch.isfinite(weight).all()):
                raise ValueError(
                    f"layer {self.layer} {name}: the weight has NaN/Inf (corrupt checkpoint)"
                )
            self.widths[name] = weight.shape[1]
        with open_h5(self.inputs, self.expected, self.ctx.handoff) as probe:
            self.shape = tuple(probe.shape(HIDDEN))

    @property
    def sequences(self) -> int:
        return self.shape[0]

    def accumulate(
        self,
        groups: list[tuple[str, ...]],
        experts: list[int],
        label: str,
        make_accumulator: Callable[..., Any] | None = None,
        all_tokens: bool = False,
        on_output: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[dict[str, Any], dict[int, int]]:
        """One pass of the calibration inputs through the layer, accumulating `groups`' inputs
        (routed experts: those in `experts`; `make_accumulator(columns, device=...)`, by default
        a HessianAccumulator). Returns the accumulators by group and the tokens
        the router sent each expert of `experts`.

        A routed expert's accumulators see the tokens the router sends it, or every token
        with `all_tokens`; the layer's output (`on_output`) always uses the real routing."""
        units, device = self.units, self.ctx.device
        make_accumulator = make_accumulator or HessianAccumulator  # looked up now: tests count it
        accumulators = {g[0]: make_accumulator(self.widths[g[0]], device=device) for g in groups}
        routed = {e: 0 for e in experts}
        hooks = []
        for group in groups:
            unit = units.units[group[0]]
            if unit.expert is None:
                acc = accumulators[group[0]]
                hooks.append(
                    self.module.get_submodule(unit.module).register_forward_pre_hook(
                        lambda _m, args, acc=acc: acc.add_rows(args[0].float())
                    )
                )
        if experts:
            ins = {e: accumulators[units.group_of(expert_unit(units, e, "gate"))] for e in experts}
            mids = {e: accumulators[units.group_of(expert_unit(units, e, "down"))] for e in experts}

            def capture(module, args, kwargs):
                # the experts module's call: the block's input and the router's real choice
                x = args[0] if args else kwargs["hidden_states"]
                index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                chosen = torch.stack([(index == e).any(dim=-1) for e in experts])
                for e, mask, count in zip(
                    experts, chosen, chosen.sum(dim=-1).tolist(), strict=True
                ):
                    routed[e] += count
                    xe = x if all_tokens else x[mask]
                    if xe.shape[0]:
                        ins[e].add_rows(xe.float())
                        mids[e].add_rows(_expert_intermediate(module, e, xe).float())

            hooks.append(
                self.module.get_submodule(family.EXPERTS).register_forward_pre_hook(
                    capture, with_kwargs=True
                )
            )
        cfg = self.ctx.cfg
        artifact, batches = hidden_batches(
            self.inputs, self.expected, cfg.calibration.batch_size, self.ctx.handoff
        )
        started, done = time.perf_counter(), 0
        try:
            with torch.no_grad():
                for batch in batches:
                    out = family.layer_forward(
                        self.module, self.ctx.checkpoint.config, batch.to(device, self.ctx.dtype)
                    )
                    if on_output is not None:
                        on_output(out)
                    done += batch.shape[0]
                    log_progress(label, done, self.sequences, started)
        finally:
            for hook in hooks:
                hook.remove()
            artifact.close()
        if done != self.sequences:
            raise ArtifactError(
                f"{self.inputs}: {done} of {self.sequences} sequences could be read"
            )
        return accumulators, routed
