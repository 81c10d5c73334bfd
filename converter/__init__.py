"""Convert images into lazily pullable twins (eStargz or zstd:chunked layers)."""
