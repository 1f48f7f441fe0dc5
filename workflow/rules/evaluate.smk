def eval_model_dir(wildcards, input):
    if wildcards.model == DENSE:
        return stages.ModelInfo.load(input.model).path
    return input.model_dir


rule evaluate_perplexity:
    """Token-level perplexity on one evaluation text (non-overlapping windows)."""
    input:
        model=model_json,
        model_dir=evaluated_model,
    output:
        f"{RUN}/{{model}}/eval/perplexity-{{metric}}.json",
    log:
        f"{RUN}/logs/{{model}}/perplexity-{{metric}}.log",
    threads: stage_threads("evaluate_perplexity")
    resources:
        **stage_resources("evaluate_perplexity"),
    run:
        with log_to(log[0]):
            stages.evaluate_perplexity(
                CFG, input.model, wildcards.model, wildcards.metric, eval_model_dir(wildcards, input), output[0]
            )


rule evaluate_zero_shot:
    """lm-eval zero-shot accuracy (acc_norm where the task has it) and the mean."""
    input:
        model=model_json,
        model_dir=evaluated_model,
    output:
        f"{RUN}/{{model}}/eval/zero_shot.json",
    log:
        f"{RUN}/logs/{{model}}/zero_shot.log",
    threads: stage_threads("evaluate_zero_shot")
    resources:
        **stage_resources("evaluate_zero_shot"),
    run:
        with log_to(log[0]):
            stages.evaluate_zero_shot(CFG, input.model, wildcards.model, eval_model_dir(wildcards, input), output[0])
