"""rose-pipeline: one-shot LLM pruning with ROSE and its baselines.

The library knows nothing of Snakemake: every workflow rule is one call into
`rose.stages`, and `python -m rose` runs the same stages in one process.
"""

__version__ = "0.1.0"
