"""Data: the sample schema, shard writer and reader, the converter from the reference's JSON, transforms, collation,
the streaming LightningDataModule, and the synthetic shapes world (``datamodules.shapes``). See ``docs/data.md``."""
