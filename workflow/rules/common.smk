# Shared by all rules: the validated config, the plan (rose.plan: the one
# description of the task graph) and the helpers that turn it into directives.
import re
import threading

from snakemake.exceptions import WorkflowError

from rose import plan as graph
from rose.artifacts import hold_lock
from rose.config import ConfigError, from_dict, write_effective
from rose.handoff import make_handoff
from rose.joblog import log_to
from rose.model_info import ModelInfo
from rose.provenance import check_run
from rose.resources import resolve_threads, rule_resources
from rose.stages import STAGES

try:
    CFG = from_dict(config)
except ConfigError as exc:  # one line naming the key and value, before any job runs
    raise WorkflowError(str(exc)) from None

try:  # a run directory belongs to one model/calibration/prune setting
    check_run(CFG, write=False)
except ValueError as exc:
    raise WorkflowError(str(exc)) from None


onstart:
    # one driver per run directory: a `python -m rose run` beside this workflow is refused
    RUN_LOCK.append(hold_lock(LAYOUT.lock, f"run directory {CFG.run_dir}"))
    check_run(CFG)
    preflight_check()
    write_effective(CFG)


RUN_LOCK = []  # the open lock file, held from onstart until the controller exits


def _threads_handoff():
    """Jobs that run as threads of this controller (the workstation profile) hand a layer's
    artifacts to its next stage in memory, as `python -m rose run` does (rose.handoff). Never
    in a cluster job or one process per job: nothing there would read the copy."""
    settings = workflow.execution_settings  # known once jobs run, not while parsing
    threads = settings is not None and settings.use_threads
    if not (threads and workflow.is_main_process and workflow.local_exec):
        return None
    return make_handoff(CFG.handoff_memory)


HANDOFF = []  # made by the first job (threads share it)
HANDOFF_LOCK = threading.Lock()


def job_handoff():
    with HANDOFF_LOCK:
        if not HANDOFF:
            HANDOFF.append(_threads_handoff())
        return HANDOFF[0]
PLAN = graph.Plan(CFG)
LAYOUT = PLAN.layout
RUN = str(CFG.run_dir)


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) or "^$"


wildcard_constraints:
    variant=_alternatives(PLAN.variants),
    model=_alternatives(PLAN.models),
    metric=_alternatives(PLAN.metrics),
    format=_alternatives(PLAN.formats),
    allocation=_alternatives(PLAN.allocations),
    layer=r"\d+",


def preflight_check():
    """Print the run's jobs, disk, memory and time (rose.preflight); stop before the first job
    when results_dir lacks the predicted peak disk (every variant's intermediates at once).
    ROSE_FORCE=1 in the environment starts it anyway."""
    from rose import preflight

    try:
        preflight.check(CFG, "snakemake", echo=print)
    except (preflight.PreflightError, ConfigError) as exc:
        raise WorkflowError(str(exc)) from None


def plan_outputs(stage):
    """The stage's outputs as patterns, temp()/directory() where the plan says so."""
    out = {}
    for name, pattern in PLAN.output_patterns(stage).items():
        if name in STAGES[stage].directories:
            pattern = directory(pattern)
        if PLAN.is_temporary(stage, name):
            pattern = temp(pattern)
        out[name] = pattern
    return out


def planned():
    """The plan with model.json, which comes from a checkpoint: the depth is known only once
    it exists (and a per-layer list that does not match it is refused, naming the key)."""
    path = checkpoints.prepare_model.get().output[0]
    try:
        return graph.Plan(CFG, ModelInfo.load(path))
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None


def plan_inputs(stage):
    """An input function: the plan's inputs for the job's wildcards (as str, for Snakemake)."""

    def inputs(wildcards):
        plan = planned()
        return {
            k: [str(p) for p in v] if isinstance(v, list) else str(v)
            for k, v in plan.inputs(stage, dict(wildcards)).items()
        }

    return inputs


def stage_threads(stage):
    """Threads (= SLURM --cpus-per-task) for `stage`, from rose.resources; the config can pin it."""
    return resolve_threads(stage, config)


def stage_resources(stage):
    """A rule's `resources:` from rose.resources (model-sized, grown on retries, config pins win).

    mem_mb and runtime are callables of (wildcards, attempt): they read model.json
    when the job is scheduled.
    """
    return rule_resources(stage, config)


def plan_log(stage):
    return PLAN.log_pattern(stage)


def run_stage(stage, wildcards, log):
    with log_to(log[0]):
        graph.execute(CFG, stage, dict(wildcards), job_handoff())


def final_outputs(wildcards):
    return [str(p) for p in PLAN.targets()]


def finish_run():
    """Remove intermediates nothing needs any more, as the runner does; print the summary."""
    if LAYOUT.model_json.exists():
        plan = graph.Plan(CFG, ModelInfo.load(LAYOUT.model_json))
        graph.remove_consumed_intermediates(plan.steps())
    summary = LAYOUT.report_dir / "summary.md"
    if summary.exists():
        print(summary.read_text())
    print(f"results: {RUN} (per-job logs under {RUN}/logs/)")
