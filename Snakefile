# rose-pipeline: prune a causal LM one decoder layer at a time with ROSE and baselines.
#
#   snakemake --profile workflow/profiles/workstation       # default config, this machine (fast: jobs as threads)
#   snakemake --cores all                                  # same, one process per job
#   snakemake --cores all --configfile my.yaml             # your model / methods / data
#   snakemake --profile workflow/profiles/slurm            # one cluster job per layer stage
#
# The task graph is described once, in rose.plan: every rule takes its inputs,
# outputs and temp() flags from it and calls rose.plan.execute for the work.

import os

from snakemake.utils import min_version

min_version("8.20")


# A config file given with --configfile is the whole config, as it is for
# `python -m rose run --config`: config/config.yaml is the default only when
# none is given (Snakemake would otherwise deep-merge the two).
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/allocation.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/assemble.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs,
    default_target: True


onsuccess:
    finish_run()
