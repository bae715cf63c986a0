"""engine.synth.diffusion."""
