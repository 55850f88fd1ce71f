"""The patient-event data layer: MEDS I/O, validation, importers, bundled datasets, synthetic data."""

from workbench.data.meds_io import MedsDataset, ShardWriter, open_dataset, write_dataset

__all__ = ["MedsDataset", "ShardWriter", "open_dataset", "write_dataset"]
