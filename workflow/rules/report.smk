REPORT_OUT = PLAN.output_patterns("report")


rule report:
    """summary.csv / summary.md (one row per variant plus dense) and the plots."""
    input:
        unpack(plan_inputs("report")),
    output:
        csv=report(REPORT_OUT["csv"], caption="../report/summary.rst", category="Summary"),
        md=REPORT_OUT["md"],
        plots=report(
            directory(REPORT_OUT["plots"]),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Plots",
        ),
    log:
        plan_log("report"),
    threads: stage_threads("report")
    resources:
        **stage_resources("report"),
    run:
        run_stage("report", wildcards, log)
