# The layer chain: inputs_i -> hessians_i -> order_i -> pruned_i -> inputs_{i+1}.
# Each step is its own job, so a failure loses at most one layer's step.


def layer_inputs(wildcards):
    return str(LAYOUT.inputs(wildcards.variant, int(wildcards.layer)))


rule hessians:
    """H = 2/N sum X^T X per input group of the dense layer on its (pruned-upstream) inputs."""
    input:
        model=model_json,
        inputs=layer_inputs,
    output:
        keep_or_temp(f"{RUN}/{{variant}}/layer_{{layer}}/hessians.h5"),
    log:
        f"{RUN}/logs/{{variant}}/layer_{{layer}}/hessians.log",
    threads: stage_threads("hessians")
    resources:
        **stage_resources("hessians"),
    run:
        with log_to(log[0]):
            stages.compute_hessians(CFG, input.model, wildcards.variant, int(wildcards.layer), input.inputs, output[0])


rule order:
    """ROSE's column/block losses, relative range, columnar flag and permutation per Linear."""
    input:
        model=model_json,
        hessians=f"{RUN}/{{variant}}/layer_{{layer}}/hessians.h5",
    output:
        f"{RUN}/{{variant}}/layer_{{layer}}/order.h5",
    log:
        f"{RUN}/logs/{{variant}}/layer_{{layer}}/order.log",
    threads: stage_threads("order")
    resources:
        **stage_resources("order"),
    run:
        with log_to(log[0]):
            stages.compute_order(CFG, input.model, wildcards.variant, int(wildcards.layer), input.hessians, output[0])


rule prune:
    """Reorder-and-prune every Linear of the layer (the SparseGPT sweep for rose/sparsegpt)."""
    input:
        unpack(prune_inputs),
    output:
        pruned=f"{RUN}/{{variant}}/layer_{{layer}}/pruned.safetensors",
        stats=f"{RUN}/{{variant}}/layer_{{layer}}/stats.json",
    log:
        f"{RUN}/logs/{{variant}}/layer_{{layer}}/prune.log",
    threads: stage_threads("prune")
    resources:
        **stage_resources("prune"),
    run:
        with log_to(log[0]):
            stages.prune_layer(
                CFG,
                input.model,
                wildcards.variant,
                int(wildcards.layer),
                input.get("hessians"),
                input.get("order"),
                output.pruned,
                output.stats,
            )


def previous_layer(wildcards):
    layer = int(wildcards.layer) - 1
    return {
        "model": model_json(),
        "inputs": str(LAYOUT.inputs(wildcards.variant, layer)),
        "pruned": str(LAYOUT.pruned(wildcards.variant, layer)),
    }


rule forward:
    """Layer i's pruned outputs on its calibration inputs are layer i+1's inputs."""
    input:
        unpack(previous_layer),
    output:
        keep_or_temp(f"{RUN}/{{variant}}/layer_{{layer}}/inputs.h5"),
    wildcard_constraints:
        layer=r"[1-9]\d*",
    log:
        f"{RUN}/logs/{{variant}}/layer_{{layer}}/forward.log",
    threads: stage_threads("forward")
    resources:
        **stage_resources("forward"),
    run:
        with log_to(log[0]):
            stages.forward_layer(
                CFG, input.model, wildcards.variant, int(wildcards.layer) - 1, input.inputs, input.pruned, output[0]
            )
