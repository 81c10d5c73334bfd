"""The warm set: images cached at node boot and kept fresh (see manager.WarmSet)."""
