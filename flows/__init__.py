"""Prefect flows: `tlcm` runs any subset of the stages; deployments are declared in deploy/prefect.yaml."""
