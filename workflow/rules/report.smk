rule report:
    """summary.csv / summary.md (one row per variant plus dense) and the plots."""
    input:
        models=[str(LAYOUT.model_dir(v)) for v in VARIANTS],
        evals=eval_outputs(),
    output:
        csv=report(
            str(LAYOUT.report_dir / "summary.csv"),
            caption="../report/summary.rst",
            category="Summary",
        ),
        md=str(LAYOUT.report_dir / "summary.md"),
        plots=report(
            directory(str(LAYOUT.report_dir / "plots")),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="Plots",
        ),
    log:
        f"{RUN}/logs/report.log",
    threads: stage_threads("report")
    resources:
        **stage_resources("report"),
    run:
        with log_to(log[0]):
            stages.build_report(CFG, RUN, str(LAYOUT.report_dir))
