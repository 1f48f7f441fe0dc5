"""Typed run settings built from the validated YAML.

The YAML is checked against rose/schema/config.schema.yaml first, so a bad key
or value fails at start with one line naming it, before any artifact exists.
Everything downstream reads these dataclasses, never the raw dict.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from rose.admm import AdmmSettings
from rose.allocation import LAYERS, OWL, UNIFORM, Allocation
from rose.artifacts import atomic_write_text
from rose.data import TextSource
from rose.export import ExportError, check_formats
from rose.layout import RunLayout
from rose.methods import MethodName, PruneSettings
from rose.sparsity import Sparsity


@dataclass(frozen=True)
class MoeSettings:
    """The `moe:` section (mixture-of-experts models only); these defaults are the config's."""

    # Every expert's Hessians from all calibration tokens (llm-compressor's default), so
    # rarely chosen experts are not pruned blind; the layer output still uses the real routing.
    calibrate_all_experts: bool = True
    # Prune the router gates (`mlp.gate`, Qwen2-MoE's `shared_expert_gate`) too.
    prune_router: bool = False


def _prune_defaults() -> dict[str, Any]:
    """`prune:`'s defaults are PruneSettings' own (the compute dtype is not a setting)."""
    settings = PruneSettings()
    return {
        f.name: getattr(settings, f.name)
        for f in fields(settings)
        if f.name not in ("compute_dtype", "admm")  # `admm:` is filled in only when used
    }


ADMM_DEFAULTS: dict[str, Any] = asdict(AdmmSettings())


DEFAULTS: dict[str, Any] = {
    "results_dir": "results",
    "device": "auto",
    "keep_intermediates": False,
    "handoff_memory": "auto",
    "model": {"revision": None, "dtype": "auto", "trust_remote_code": False, "allow_pickle": False},
    "calibration": {"seed": 0, "batch_size": 8},
    "prune": {**_prune_defaults(), "layers": None},
    "evaluation": None,
    "export": {"formats": ["dense"]},
    "moe": asdict(MoeSettings()),
}
EVAL_DEFAULTS: dict[str, Any] = {"batch_size": 4, "perplexity": [], "zero_shot": None}
ZERO_SHOT_DEFAULTS: dict[str, Any] = {
    "tasks": [
        "winogrande",
        "boolq",
        "piqa",
        "openbookqa",
        "hellaswag",
        "arc_easy",
        "arc_challenge",
    ],
    "limit": None,
    "batch_size": 8,
    "offline": False,
    "task_dirs": [],
}


class ConfigError(ValueError):
    """The run configuration is invalid; the message names the key and value."""


@dataclass(frozen=True)
class ModelSettings:
    source: str
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class CalibrationSettings:
    source: TextSource
    nsamples: int
    seqlen: int
    seed: int = 0
    batch_size: int = 8


@dataclass(frozen=True)
class PerplexitySpec:
    name: str
    source: TextSource
    seqlen: int
    max_windows: int | None = None


@dataclass(frozen=True)
class ZeroShotSettings:
    tasks: tuple[str, ...]
    limit: int | None = None
    batch_size: int = 8
    offline: bool = False
    task_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluationSettings:
    batch_size: int = 4
    perplexity: tuple[PerplexitySpec, ...] = ()
    zero_shot: ZeroShotSettings | None = None


@dataclass(frozen=True)
class Variant:
    method: str
    sparsity: Sparsity  # the model-wide target (a `layers` list: its plain mean, nominal)
    allocation: Allocation = Allocation()

    @property
    def target(self) -> str:
        """The name without the method: '0.7', 'owl-0.7', 'layers'. Variants of every method
        with the same target share its allocation (allocation/<target>.json)."""
        if self.allocation.kind == UNIFORM:
            return self.sparsity.label
        if self.allocation.kind == LAYERS:
            return self.allocation.name
        return f"{self.allocation.name}-{self.sparsity.label}"

    @property
    def name(self) -> str:
        return f"{self.method}-{self.target}"

    @property
    def method_name(self) -> MethodName:
        return MethodName.parse(self.method)

    @property
    def base_method(self) -> str:
        """The method that chooses the mask: 'rose' for 'rose+admm'."""
        return self.method_name.base

    @property
    def needs_hessian(self) -> bool:
        """Its layer chain computes Hessians (and so carries each layer's inputs)."""
        return self.method_name.needs_hessian

    @property
    def needs_order(self) -> bool:
        """Its layer chain has an `order` stage."""
        return self.method_name.needs_order

    @property
    def uses_admm(self) -> bool:
        """`prune.admm` decides its weights (a refit, or the admm method)."""
        return self.method_name.uses_admm


@dataclass(frozen=True)
class RunConfig:
    run: str
    model: ModelSettings
    calibration: CalibrationSettings
    methods: tuple[str, ...]
    sparsities: tuple[Sparsity, ...]
    prune: PruneSettings
    layers: int | None = None
    results_dir: str = "results"
    device: str = "auto"
    keep_intermediates: bool = False
    handoff_memory: float | str = "auto"
    evaluation: EvaluationSettings | None = None
    export_formats: tuple[str, ...] = ("dense",)
    allocations: tuple[Allocation, ...] = (Allocation(),)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.run

    @property
    def variants(self) -> list[Variant]:
        """Methods x allocations x their targets (uniform only: methods x sparsities, as ever)."""
        out = []
        for method in self.methods:
            if method == "dense":
                continue
            for allocation in self.allocations:
                out += [Variant(method, s, allocation) for s in self.targets(allocation)]
        return out

    def targets(self, allocation: Allocation) -> tuple[Sparsity, ...]:
        if allocation.kind == LAYERS:
            fractions = allocation.fractions
            return (Sparsity(fraction=round(sum(fractions) / len(fractions), 6)),)
        if allocation.kind == OWL and allocation.sparsities:
            return tuple(Sparsity(fraction=float(s)) for s in allocation.sparsities)
        return self.sparsities

    @property
    def owl_m_values(self) -> tuple[float, ...]:
        """The outlier thresholds the dense statistics pass measures (one pass for all)."""
        return tuple(sorted({a.m for a in self.allocations if a.kind == OWL}))

    @property
    def admm(self) -> AdmmSettings:
        """The `prune.admm:` settings, defaults filled in."""
        return AdmmSettings(**{**ADMM_DEFAULTS, **self.raw["prune"].get("admm", {})})

    @property
    def admm_if_changed(self) -> dict[str, Any]:
        """{"admm": the settings} when they differ from the defaults, else {}: what the section
        adds to the run's identity, so adding an ADMM variant with the defaults to an existing
        run keeps it (the ADMM variants' own provenance always carries the settings)."""
        return {} if asdict(self.admm) == ADMM_DEFAULTS else {"admm": asdict(self.admm)}

    @property
    def moe(self) -> MoeSettings:
        """The `moe:` settings (read from the effective settings, defaults filled in)."""
        return MoeSettings(**self.raw["moe"])

    @property
    def moe_if_changed(self) -> dict[str, Any]:
        """{"moe": the settings} when they differ from the defaults, else {}: what the section
        adds to provenance and the run's identity, so runs made before it existed keep theirs."""
        return {} if self.raw["moe"] == DEFAULTS["moe"] else {"moe": self.raw["moe"]}

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise ConfigError(
            f"variant {name!r} is not in this config (have: {', '.join(v.name for v in self.variants)})"
        )


def schema() -> dict[str, Any]:
    text = resources.files("rose").joinpath("schema/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(raw: dict[str, Any]) -> None:
    if not isinstance(raw, dict):
        raise ConfigError("config: expected a mapping at the top level")
    for index, method in enumerate(raw.get("methods") or []):
        if isinstance(method, str) and method.endswith("+admm"):
            try:
                MethodName.parse(method)
            except ValueError as exc:  # say why (dense+admm), not only "is not one of"
                raise ConfigError(f"config: methods.{index} = {exc}") from None
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(str(p) for p in error.absolute_path) or "<top level>"
        value = error.instance if error.absolute_path else ""
        shown = f" = {value!r}" if error.absolute_path else ""
        message = error.message
        if error.absolute_path and error.absolute_path[0] == "sparsities":
            message = "a sparsity is a fraction in [0, 1) or an N:M pattern such as '2:4'"
        raise ConfigError(f"config: {key}{shown}: {_short(message)}")


def _short(message: str) -> str:
    return message if len(message) < 200 else message[:197] + "..."


def _source(raw: dict[str, Any]) -> TextSource:
    return TextSource(**raw)


def from_dict(given: dict[str, Any]) -> RunConfig:
    """Validate a config mapping (as Snakemake's `config`) and build the settings."""
    validate(given)
    raw = merge(DEFAULTS, given)
    if raw.get("evaluation"):
        raw["evaluation"] = merge(EVAL_DEFAULTS, raw["evaluation"])
        if raw["evaluation"].get("zero_shot"):
            raw["evaluation"]["zero_shot"] = merge(
                ZERO_SHOT_DEFAULTS, raw["evaluation"]["zero_shot"]
            )
    else:
        raw["evaluation"] = None
    sparsities = []
    for value in raw["sparsities"]:
        try:
            sparsities.append(Sparsity.parse(value))
        except ValueError as exc:
            raise ConfigError(f"config: sparsities = {value!r}: {exc}") from None
    prune = raw["prune"]
    if prune["blocksize"] < 1:
        raise ConfigError("config: prune.blocksize must be positive")
    if "admm" in prune or any(MethodName.parse(m).uses_admm for m in raw["methods"]):
        prune["admm"] = {**ADMM_DEFAULTS, **(prune.get("admm") or {})}
    try:
        admm = AdmmSettings(**prune.get("admm", ADMM_DEFAULTS))
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None
    calib = raw["calibration"]
    evaluation = None
    if raw["evaluation"]:
        ev = raw["evaluation"]
        zs = ev.get("zero_shot")
        evaluation = EvaluationSettings(
            batch_size=ev["batch_size"],
            perplexity=tuple(
                PerplexitySpec(
                    name=p["name"],
                    source=_source(p["source"]),
                    seqlen=p.get("seqlen", calib["seqlen"]),
                    max_windows=p.get("max_windows"),
                )
                for p in ev["perplexity"]
            ),
            zero_shot=ZeroShotSettings(
                tasks=tuple(zs["tasks"]),
                limit=zs["limit"],
                batch_size=zs["batch_size"],
                offline=zs["offline"],
                task_dirs=tuple(zs["task_dirs"]),
            )
            if zs
            else None,
        )
        names = [p.name for p in evaluation.perplexity]
        if len(set(names)) != len(names):
            raise ConfigError(f"config: evaluation.perplexity names must be unique, got {names}")
    return RunConfig(
        run=raw["run"],
        model=ModelSettings(**raw["model"]),
        calibration=CalibrationSettings(
            source=_source(calib["source"]),
            nsamples=calib["nsamples"],
            seqlen=calib["seqlen"],
            seed=calib["seed"],
            batch_size=calib["batch_size"],
        ),
        methods=tuple(raw["methods"]),
        sparsities=tuple(sparsities),
        prune=PruneSettings(
            blocksize=prune["blocksize"],
            percdamp=prune["percdamp"],
            threshold=prune["threshold"],
            reorder=prune["reorder"],
            admm=admm,
        ),
        layers=prune["layers"],
        results_dir=raw["results_dir"],
        device=raw["device"],
        keep_intermediates=raw["keep_intermediates"],
        handoff_memory=raw["handoff_memory"],
        evaluation=evaluation,
        export_formats=_export_formats(raw),
        allocations=_allocations(raw.get("allocation", UNIFORM), tuple(sparsities)),
        raw=raw,
    )


DEFAULT_ALLOCATION = Allocation()  # OWL's m and lambda when an entry leaves them out


def _allocations(value: Any, sparsities: tuple[Sparsity, ...]) -> tuple[Allocation, ...]:
    """The `allocation:` entries (schema-checked) as records; names unique, no N:M with OWL."""
    entries = value if isinstance(value, list) else [value]
    single = not isinstance(value, list)
    out: list[Allocation] = []
    for index, entry in enumerate(entries):
        key = "allocation" if single else f"allocation.{index}"
        spec = {"kind": entry} if isinstance(entry, str) else dict(entry)
        kind = spec["kind"]
        name = spec.get("name", kind)
        if kind == UNIFORM and name != UNIFORM:
            raise ConfigError(f"config: {key}.name: a uniform entry has no name")
        if kind != UNIFORM and name == UNIFORM:
            raise ConfigError(f"config: {key}.name: 'uniform' names the uniform allocation")
        if kind == LAYERS and "fractions" not in spec:
            raise ConfigError(
                f"config: {key}.fractions: a layers entry needs its list of fractions"
            )
        for option, allowed in (("fractions", LAYERS), ("m", OWL), ("lambda", OWL)):
            if option in spec and kind != allowed:
                raise ConfigError(f"config: {key}.{option}: only for kind {allowed}")
        if "sparsities" in spec and kind != OWL:
            raise ConfigError(f"config: {key}.sparsities: only for kind owl")
        if kind == OWL:
            targets = spec.get("sparsities")
            nm = [str(s) for s in sparsities if s.is_nm] if targets is None else []
            if nm:
                raise ConfigError(
                    f"config: sparsities = {nm[0]!r}: an N:M target cannot be allocated per layer "
                    f"by {key} (owl); give that entry its own `sparsities:` without N:M targets"
                )
        out.append(
            Allocation(
                kind=kind,
                name=name,
                m=float(spec.get("m", DEFAULT_ALLOCATION.m)),
                lam=float(spec.get("lambda", DEFAULT_ALLOCATION.lam)),
                fractions=tuple(float(f) for f in spec.get("fractions", ())),
                sparsities=tuple(float(s) for s in spec.get("sparsities", ())),
                key=key,
            )
        )
    names = [a.name for a in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                f"config: allocation: two entries are named {name!r}; give each its own `name:`"
            )
    return tuple(out)


def _export_formats(raw: dict[str, Any]) -> tuple[str, ...]:
    """An unknown format, or `compressed` without its package, stops the run before any work."""
    formats = (raw.get("export") or {}).get("formats", [])
    try:
        return tuple(check_formats(formats))
    except ExportError as exc:
        raise ConfigError(f"config: export.formats: {exc}") from None


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (safe_load) and apply nested overrides."""
    path = Path(path)
    try:
        given = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return from_dict(merge(given or {}, overrides or {}))


def parse_override(text: str) -> dict[str, Any]:
    """'calibration.nsamples=16' -> {'calibration': {'nsamples': 16}} (value parsed as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value")
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def effective(cfg: RunConfig) -> str:
    """The settings a run uses, defaults filled in, as YAML: what `rose check` prints and
    what both drivers record in the run directory, so a config file provably means one thing."""
    return yaml.safe_dump(_plain(cfg.raw), sort_keys=True, default_flow_style=False)


def _plain(value: Any) -> Any:
    """Mappings as dicts (Snakemake hands its config over as OrderedDicts, which safe_dump refuses)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def write_effective(cfg: RunConfig) -> Path:
    """Record the effective settings of this invocation (results/<run>/config.effective.yaml)."""
    path = RunLayout(cfg.run_dir).effective_config
    atomic_write_text(path, effective(cfg))
    return path
