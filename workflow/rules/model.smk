checkpoint prepare_model:
    """Resolve the model source to a local safetensors checkpoint; record its shape."""
    output:
        **plan_outputs("prepare_model"),
    log:
        plan_log("prepare_model"),
    threads: stage_threads("prepare_model")
    resources:
        **stage_resources("prepare_model"),
    run:
        run_stage("prepare_model", wildcards, log)
