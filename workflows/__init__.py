"""secvec workflows: Pydantic specs, Ray Train stage jobs, MLflow tracking and registry, CLI.

Composes ``secvec_core``; holds no algorithm of its own.
"""
