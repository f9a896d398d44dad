"""unclip.datasets: URL lists to image shards, CLIP embeddings, manifests and readers (see architecture.md)."""
