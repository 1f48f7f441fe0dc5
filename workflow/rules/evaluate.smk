rule evaluate_perplexity:
    """Token-level perplexity on one evaluation text (non-overlapping windows)."""
    input:
        unpack(plan_inputs("evaluate_perplexity")),
    output:
        **plan_outputs("evaluate_perplexity"),
    log:
        plan_log("evaluate_perplexity"),
    threads: stage_threads("evaluate_perplexity")
    resources:
        **stage_resources("evaluate_perplexity"),
    run:
        run_stage("evaluate_perplexity", wildcards, log)


rule evaluate_zero_shot:
    """lm-eval zero-shot accuracy (acc_norm where the task has it) and the mean."""
    input:
        unpack(plan_inputs("evaluate_zero_shot")),
    output:
        **plan_outputs("evaluate_zero_shot"),
    log:
        plan_log("evaluate_zero_shot"),
    threads: stage_threads("evaluate_zero_shot")
    resources:
        **stage_resources("evaluate_zero_shot"),
    run:
        run_stage("evaluate_zero_shot", wildcards, log)
