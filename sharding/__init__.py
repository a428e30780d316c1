"""Storage and the data contract: input readers, Parquet schemas, manifests."""
