"""Helpers shared by the test modules: tiny model configs (``configs``), generated images (``images``), a
tiny DINOv2 (``dino``), a mock of the Hugging Face Hub (``hub``), tiny diffusers pipelines
(``pipelines``) and broken model folders (``bad_inputs``)."""
