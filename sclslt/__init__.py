"""sclslt: distributed trainer for gloss-free sign language translation with Selective Contrastive Learning."""
__version__ = "0.1.0"
