"""Human-facing output: rich tables, terminal heatmaps, optional PNG plots, JSON manifests."""
