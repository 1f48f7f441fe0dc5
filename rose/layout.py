"""Where every artifact of a run lives; the Snakefile and the runner share these names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DENSE = "dense"


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path

    @property
    def model_json(self) -> Path:
        return self.run_dir / "model.json"

    @property
    def tokens(self) -> Path:
        return self.run_dir / "calib" / "tokens.h5"

    def layer_dir(self, variant: str, layer: int | str) -> Path:
        return self.run_dir / variant / f"layer_{layer}"

    def inputs(self, variant: str, layer: int) -> Path:
        """Layer 0's inputs (embeddings) are shared by all variants; the dense model's later
        inputs are the dense statistics pass's outputs of the layer before."""
        if layer == 0:
            return self.run_dir / "calib" / "inputs.h5"
        if variant == DENSE:
            return self.dense_outputs(layer - 1)
        return self.forward_inputs(variant, layer)

    def dense_outputs(self, layer: int | str) -> Path:
        """The dense layer's outputs on the dense calibration inputs (the next layer's inputs)."""
        return self.layer_dir(DENSE, layer) / "outputs.h5"

    def outliers(self, layer: int | str) -> Path:
        """The dense layer's outlier statistics (OWL), one file per layer."""
        return self.layer_dir(DENSE, layer) / "outliers.json"

    def allocation(self, target: str) -> Path:
        """Per-layer sparsities of one non-uniform target ('owl-0.7'), shared by every method."""
        return self.run_dir / "allocation" / f"{target}.json"

    def forward_inputs(self, variant: str, layer: int | str) -> Path:
        """Inputs of a layer >= 1: the previous pruned layer's outputs, one file per variant."""
        return self.layer_dir(variant, layer) / "inputs.h5"

    def hessians(self, variant: str, layer: int) -> Path:
        """Layer 0's Hessians (the dense layer on the shared embeddings) are shared too."""
        if layer == 0:
            return self.shared_hessians
        return self.variant_hessians(variant, layer)

    @property
    def shared_hessians(self) -> Path:
        return self.run_dir / "calib" / "hessians.h5"

    def variant_hessians(self, variant: str, layer: int | str) -> Path:
        """A layer >= 1's Hessians: from the variant's own (pruned-upstream) inputs."""
        return self.layer_dir(variant, layer) / "hessians.h5"

    def order(self, variant: str, layer: int) -> Path:
        return self.layer_dir(variant, layer) / "order.h5"

    def pruned(self, variant: str, layer: int) -> Path:
        return self.layer_dir(variant, layer) / "pruned.safetensors"

    def stats(self, variant: str, layer: int) -> Path:
        return self.layer_dir(variant, layer) / "stats.json"

    def model_dir(self, variant: str) -> Path:
        return self.run_dir / variant / "model"

    def export_dir(self, variant: str, fmt: str) -> Path:
        return self.run_dir / variant / "export" / fmt

    def perplexity(self, variant: str, name: str) -> Path:
        return self.run_dir / variant / "eval" / f"perplexity-{name}.json"

    def zero_shot(self, variant: str) -> Path:
        return self.run_dir / variant / "eval" / "zero_shot.json"

    @property
    def report_dir(self) -> Path:
        return self.run_dir / "report"

    @property
    def lock(self) -> Path:
        """Held by whichever driver works on the run directory (one at a time)."""
        return self.run_dir / ".rose.lock"

    @property
    def effective_config(self) -> Path:
        return self.run_dir / "config.effective.yaml"

    def log(self, stage: str, wildcards: Mapping[str, str]) -> Path:
        """logs/[<variant>|<model>/][layer_<i>/]<stage>[-<metric>].log: one file per job."""
        path = self.run_dir / "logs"
        if "allocation" in wildcards:
            path = path / "allocation"
        elif "variant" not in wildcards and "layer" in wildcards:
            path = path / DENSE  # the dense statistics pass
        for key in ("variant", "model", "allocation"):
            if key in wildcards:
                path = path / str(wildcards[key])
        if "layer" in wildcards:
            path = path / f"layer_{wildcards['layer']}"
        suffix = "".join(f"-{wildcards[k]}" for k in ("metric", "format") if k in wildcards)
        return path / f"{stage}{suffix}.log"
