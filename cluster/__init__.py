"""Everything that operates: the `edp` CLI, job entrypoints, promotion, configs, local stack."""
