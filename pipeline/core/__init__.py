"""tonetune's shared core: everything the stages and the registry have in common.

The layer rule: `pipeline.core` imports no stage module and nothing from `registry`; each stage
(`pipeline.<stage>`) imports only `pipeline.core`; `registry` imports only `pipeline.core`.
`make lint` checks it with import-linter (contracts in pyproject.toml).
"""
