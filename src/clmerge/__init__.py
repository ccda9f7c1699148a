"""clmerge: continual learning of CLIP models through model merging."""

__version__ = "0.1.0"
