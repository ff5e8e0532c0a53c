"""Prefect tasks: thin wrappers over tlcm_core stage functions, one unit of work each."""

from .stages import PrefectReporter, stage_task

__all__ = ["PrefectReporter", "stage_task"]
