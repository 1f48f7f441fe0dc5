rule export:
    """A shippable copy of a variant in one format (dense hard links, compressed-tensors) with its model card."""
    input:
        unpack(plan_inputs("export")),
    output:
        **plan_outputs("export"),
    log:
        plan_log("export"),
    threads: stage_threads("export")
    resources:
        **stage_resources("export"),
    run:
        run_stage("export", wildcards, log)
