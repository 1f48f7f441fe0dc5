rule assemble:
    """Pruned Linears + untouched tensors -> a loadable HF model dir with pruning.json."""
    input:
        unpack(variant_layers),
    output:
        directory(f"{RUN}/{{variant}}/model"),
    log:
        f"{RUN}/logs/{{variant}}/assemble.log",
    threads: stage_threads("assemble")
    resources:
        **stage_resources("assemble"),
    run:
        with log_to(log[0]):
            stages.assemble_model(CFG, input.model, wildcards.variant, input.pruned, input.stats, output[0])
