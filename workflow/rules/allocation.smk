# Non-uniform sparsity (allocation: owl | layers): the dense statistics pass, one job per
# layer, and one allocation per target, shared by every method that prunes to it.


rule outliers:
    """OWL: the dense layer on the dense inputs; its outlier densities and its outputs."""
    input:
        unpack(plan_inputs("outliers")),
    output:
        **plan_outputs("outliers"),
    log:
        plan_log("outliers"),
    threads: stage_threads("outliers")
    resources:
        **stage_resources("outliers"),
    run:
        run_stage("outliers", wildcards, log)


rule allocate:
    """Per-layer sparsities of one target (allocation/<target>.json)."""
    input:
        unpack(plan_inputs("allocate")),
    output:
        **plan_outputs("allocate"),
    log:
        plan_log("allocate"),
    threads: stage_threads("allocate")
    resources:
        **stage_resources("allocate"),
    run:
        run_stage("allocate", wildcards, log)
