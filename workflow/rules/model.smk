checkpoint prepare_model:
    """Resolve the model source to a local safetensors checkpoint; record its shape."""
    output:
        f"{RUN}/model.json",
    log:
        f"{RUN}/logs/prepare_model.log",
    threads: stage_threads("prepare_model")
    resources:
        **stage_resources("prepare_model"),
    run:
        with log_to(log[0]):
            stages.prepare_model(CFG, output[0])
