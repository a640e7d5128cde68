"""tokenkit: k-CLIP visual tokenizers and an offline, verifiable token cache.

Data flows one way: images -> CLIP grid features -> k-means codebook -> token store.
"""

__version__ = "0.1.0"
