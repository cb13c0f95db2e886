"""The graph passes of the pipeline, one module each: match -> profile -> bases -> rewrite, plus
the train/eval `mode` pass that exported graphs need."""
