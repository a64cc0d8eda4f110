"""One LightningModule per domain, all built on `lightning_moe.module.AdapterModule`."""
