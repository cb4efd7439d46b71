"""PyTorch re-creations of the VidRD reference's models, built on diffusers, for parity tests.

Written from the reference's documented structure (github anonymous0x233/ReuseAndDiffuse),
not copied; their state-dict keys are the reference release's, so the converters see exactly
the names ``ModelT2V.pth`` and ``vae_finetuned/`` contain.
"""
