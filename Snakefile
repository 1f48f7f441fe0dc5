# rose-pipeline: prune a causal LM one decoder layer at a time with ROSE and baselines.
#
#   snakemake --profile workflow/profiles/workstation       # default config, this machine (fast: jobs as threads)
#   snakemake --cores all                                  # same, one process per job
#   snakemake --cores all --configfile my.yaml             # your model / methods / data
#   snakemake --profile workflow/profiles/slurm            # one cluster job per layer stage
#
# The rules are thin: each parses its wildcards and calls one function of `rose.stages`.

from snakemake.utils import min_version

min_version("8.20")



configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/assemble.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs,
    default_target: True


onsuccess:
    summary = LAYOUT.report_dir / "summary.md"
    if summary.exists():
        print(summary.read_text())
    print(f"results: {RUN} (per-job logs under {RUN}/logs/)")
