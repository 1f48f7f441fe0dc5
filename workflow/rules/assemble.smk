rule assemble:
    """Pruned Linears + untouched tensors -> a loadable HF model dir with pruning.json."""
    input:
        unpack(plan_inputs("assemble")),
    output:
        **plan_outputs("assemble"),
    log:
        plan_log("assemble"),
    threads: stage_threads("assemble")
    resources:
        **stage_resources("assemble"),
    run:
        run_stage("assemble", wildcards, log)
