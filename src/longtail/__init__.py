"""longtail: Longtail Guidance (LTG) -- mine what a classifier finds rare or hard with a latent diffusion model.

Modules: ``signals`` (longtail scores), ``heads`` (Epistemic Head), ``guidance`` (Eq. 8-11),
``sampling`` (the guided DDIM loop). See README.md for the map.
"""

__version__ = "0.1.0"
