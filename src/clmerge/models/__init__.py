"""Models: open_clip loading, the trained tower's parameters, zero-shot heads."""
