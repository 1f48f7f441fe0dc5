# The layer chain: inputs_i -> hessians_i -> order_i -> pruned_i -> inputs_{i+1}
# (layer 0's inputs and Hessians are shared by every variant).
# Each step is its own job, so a failure loses at most one layer's step.


rule shared_hessians:
    """Layer 0's Hessians: the dense layer on the shared embeddings (one file for every variant)."""
    input:
        unpack(plan_inputs("shared_hessians")),
    output:
        **plan_outputs("shared_hessians"),
    log:
        plan_log("shared_hessians"),
    threads: stage_threads("shared_hessians")
    resources:
        **stage_resources("shared_hessians"),
    run:
        run_stage("shared_hessians", wildcards, log)


rule hessians:
    """H = 2/N sum X^T X per input group of the dense layer on its (pruned-upstream) inputs."""
    input:
        unpack(plan_inputs("hessians")),
    output:
        **plan_outputs("hessians"),
    wildcard_constraints:
        layer=r"[1-9]\d*",
    log:
        plan_log("hessians"),
    threads: stage_threads("hessians")
    resources:
        **stage_resources("hessians"),
    run:
        run_stage("hessians", wildcards, log)


rule order:
    """ROSE's column/block losses, relative range, columnar flag and permutation per Linear."""
    input:
        unpack(plan_inputs("order")),
    output:
        **plan_outputs("order"),
    log:
        plan_log("order"),
    threads: stage_threads("order")
    resources:
        **stage_resources("order"),
    run:
        run_stage("order", wildcards, log)


rule prune:
    """Reorder-and-prune every Linear of the layer (the SparseGPT sweep for rose/sparsegpt)."""
    input:
        unpack(plan_inputs("prune")),
    output:
        **plan_outputs("prune"),
    log:
        plan_log("prune"),
    threads: stage_threads("prune")
    resources:
        **stage_resources("prune"),
    run:
        run_stage("prune", wildcards, log)


rule forward:
    """Layer i-1's pruned outputs on its calibration inputs are layer i's inputs."""
    input:
        unpack(plan_inputs("forward")),
    output:
        **plan_outputs("forward"),
    wildcard_constraints:
        layer=r"[1-9]\d*",
    log:
        plan_log("forward"),
    threads: stage_threads("forward")
    resources:
        **stage_resources("forward"),
    run:
        run_stage("forward", wildcards, log)
