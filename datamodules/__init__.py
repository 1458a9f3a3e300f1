"""LightningDataModules that turn edit datasets into batches."""
