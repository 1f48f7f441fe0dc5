rule capture_calibration:
    """Sample nsamples x seqlen calibration tokens (seeded, paper protocol)."""
    input:
        model=model_json,
    output:
        str(LAYOUT.tokens),
    log:
        f"{RUN}/logs/capture_calibration.log",
    threads: stage_threads("capture_calibration")
    resources:
        **stage_resources("capture_calibration"),
    run:
        with log_to(log[0]):
            stages.capture_calibration(CFG, input.model, output[0])


rule embed_calibration:
    """Layer 0's inputs: the embeddings of the calibration tokens (shared by all variants)."""
    input:
        model=model_json,
        tokens=str(LAYOUT.tokens),
    output:
        keep_or_temp(str(LAYOUT.inputs(DENSE, 0))),
    log:
        f"{RUN}/logs/embed_calibration.log",
    threads: stage_threads("embed_calibration")
    resources:
        **stage_resources("embed_calibration"),
    run:
        with log_to(log[0]):
            stages.embed_calibration(CFG, input.model, input.tokens, output[0])
