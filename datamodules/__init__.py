"""LightningDataModules that turn edit datasets into batches."""

from datamodules.attribute_data import BiasInBiosDataModule, ExampleDataModule, McRaeDataModule
from datamodules.remedi_data import (
    CaseBatch,
    CounterFactDataModule,
    EditCaseDataModule,
    EpochShuffleSampler,
)

__all__ = [
    "BiasInBiosDataModule",
    "CaseBatch",
    "CounterFactDataModule",
    "EditCaseDataModule",
    "EpochShuffleSampler",
    "ExampleDataModule",
    "McRaeDataModule",
]
