rule capture_calibration:
    """Sample nsamples x seqlen calibration tokens (seeded, paper protocol)."""
    input:
        unpack(plan_inputs("capture_calibration")),
    output:
        **plan_outputs("capture_calibration"),
    log:
        plan_log("capture_calibration"),
    threads: stage_threads("capture_calibration")
    resources:
        **stage_resources("capture_calibration"),
    run:
        run_stage("capture_calibration", wildcards, log)


rule embed_calibration:
    """Layer 0's inputs: the embeddings of the calibration tokens (shared by all variants)."""
    input:
        unpack(plan_inputs("embed_calibration")),
    output:
        **plan_outputs("embed_calibration"),
    log:
        plan_log("embed_calibration"),
    threads: stage_threads("embed_calibration")
    resources:
        **stage_resources("embed_calibration"),
    run:
        run_stage("embed_calibration", wildcards, log)
